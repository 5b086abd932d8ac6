"""The architecture matrix through the real engine (scheduler, KV cache, batching), against
PEFT: for each tiny random architecture, two adapters made by PEFT, served by name and as a
forced two-adapter blend, one at a time and all at once, must give PEFT's greedy tokens, and
logprobs within 1e-3 (float32; the engine's cached, batched, left-padded decode sums in
another order than a full recompute).

The reference: PeftModel's forward for a named adapter; for the blend, the base with PEFT's
own `get_delta_weight` of each adapter added, weighted. Greedy decoding recomputes the whole
sequence each step, no cache.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from app.engine.engine import Engine
from app.engine.types import GenerationRequest, SamplingParams
from tests.tiny_archs import ARCHS, make_adapter, save_tiny, tiny_model

LOGPROB_ATOL = 1e-3
MAX_TOKENS = 6
MIX = (("one", 0.6), ("two", 0.4))
PROMPTS = ["what is two plus three", "how long do I boil an egg", "the train to Lyon leaves"]


@pytest.fixture(scope="module", params=list(ARCHS))
def served(request, micro_zoo, micro_settings, tmp_path_factory):
    model_type = request.param
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.base_dir)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               max_position_embeddings=512)
    root = tmp_path_factory.mktemp(f"engine_{model_type}")
    save_tiny(model_type, root / "base", **ids)
    tokenizer.save_pretrained(root / "base")
    _, targets = ARCHS[model_type]
    for name, seed, extra in (("one", 1, {}), ("two", 2, {"r": 2, "use_rslora": True})):
        make_adapter(tiny_model(model_type, **ids), root / "store" / name, seed=seed,
                     target_modules=targets, **extra)
        shutil.copy(micro_zoo.store_dir / "math" / "exemplars.jsonl", root / "store" / name)
    settings = micro_settings.model_copy(update={
        "base_model": root / "base", "adapter_store": root / "store", "max_batch_size": 8,
    })
    engine = Engine(settings)
    engine.load(show_progress=False)
    try:
        yield model_type, root, ids, engine
    finally:
        engine.shutdown()


def _request(engine, prompt, model):
    return GenerationRequest(
        prompt=prompt, route_text=prompt, model="auto" if model == "blend" else model,
        mix=MIX if model == "blend" else None,
        sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0,
                                ignore_eos=True))


def _collect(stream):
    tokens, logprobs = [], []
    for event in stream:
        tokens += list(event.token_ids)
        logprobs += [lp.logprob for lp in event.logprobs]
    return tokens, logprobs


def _reference(model_type, root, ids, model, prompt_ids):
    base = tiny_model(model_type, **ids)
    if model == "base":
        net = base
    elif model == "blend":
        net = base
        for adapter_id, weight in MIX:
            peft_model = PeftModel.from_pretrained(tiny_model(model_type, **ids),
                                                   root / "store" / adapter_id)
            for name, module in peft_model.base_model.model.named_modules():
                if hasattr(module, "get_delta_weight") and "default" in module.lora_A:
                    with torch.no_grad():
                        net.get_submodule(name).weight += weight * module.get_delta_weight(
                            "default")
    else:
        net = PeftModel.from_pretrained(base, root / "store" / model).eval()
    sequence, tokens, logprobs = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = net(input_ids=torch.tensor([sequence])).logits[0, -1]
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
            sequence.append(token)
    return tokens, logprobs


def test_named_and_blended_equal_peft_alone_and_concurrent(served):
    model_type, root, ids, engine = served
    cases = [(prompt, model) for prompt in PROMPTS[:2] for model in ("one", "two", "blend")]
    cases += [(PROMPTS[2], "base"), (PROMPTS[2], "blend")]
    alone = [_collect(engine.submit(_request(engine, p, m))) for p, m in cases]
    streams = [engine.submit(_request(engine, p, m)) for p, m in cases]  # all in flight
    together = [_collect(s) for s in streams]
    outputs = set()
    for (prompt, model), one, both in zip(cases, alone, together, strict=True):
        prompt_ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tokens, logprobs = _reference(model_type, root, ids, model, prompt_ids)
        for got in (one, both):
            assert got[0] == tokens, (model_type, model, prompt)
            assert max(abs(a - b) for a, b in zip(got[1], logprobs, strict=True)) < LOGPROB_ATOL
        outputs.add((prompt, tuple(tokens)))
    assert len(outputs) > len(PROMPTS), "adapters must change some greedy answers"
