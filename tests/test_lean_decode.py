"""The lean decode forward (app/engine/lean_decode.py) against references.

- Forward level, a tiny random Llama (GQA, 2 layers) built here: rows of different lengths and
  mixes (base, each adapter, a two-adapter blend, a virtual slot of a non-linear merge with
  factored and dense parts, a free slot in between), decoded over the KV pool's slots, rows
  leaving and joining between steps. Each step's logits against the transformers forward of
  the row alone (no cache) and against PEFT's forward (the adapter alone, the blend by
  `add_weighted_adapter(..., "cat")`, which is exact for a linear blend).
- Scheduler level, the micro engine: greedy tokens identical and logprobs within LOGPROB_ATOL
  to the transformers decode path, rows joining every step and leaving at different steps.
- Layout: a broken fused layout (k and v swapped) must fail these comparisons.

Tolerances: float32 throughout, logits O(1); the lean forward only sums in another order
(fused matmuls, another GEMM layout), so 1e-4 absolute on logits and logprobs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from adapters.registry import load_adapter
from app.engine.blend import AUTO_MODEL, blend_for
from app.engine.blended_lora import BlendBatch, BlendContext, install_blended_layers
from app.engine.device_slots import DeviceSlots
from app.engine.engine import Engine, _rounded
from app.engine.kv_pool import SlotPool, pool_for
from app.engine.lean_decode import LeanDecoder, unsupported
from app.engine.scheduler import Scheduler
from tests import test_kv_demo as kv_demo
from tests.engine_harness import Harness
from tests.tiny_archs import make_adapter, tiny_model

ATOL = 1e-4
LOGPROB_ATOL = 1e-4
DEMO_LOGPROB_ATOL = 1e-4  # 30 layers, hidden 576: measured max gap in the note
demo_engine = kv_demo.demo_engine  # the demo model's engine (module scope: loaded once here)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
VIRTUAL = 2  # the first virtual slot (two adapters before it)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    make_adapter(tiny_model("llama", **CONFIG), root / "one", seed=1, target_modules=ALL)
    make_adapter(tiny_model("llama", **CONFIG), root / "two", seed=2, r=2, lora_alpha=8,
                 target_modules=["k_proj", "v_proj", "up_proj", "o_proj"])
    model = tiny_model("llama", **CONFIG)
    pristine = copy.deepcopy(model)
    context = BlendContext()
    layers = install_blended_layers(model, None, context, num_slots=4)
    bank = DeviceSlots(layers, num_adapters=2, num_virtual=2)
    for adapter_id in ("one", "two"):
        slot, _ = bank.claim("adapter")
        bank.write(slot, load_adapter(root, adapter_id, bank.base_shapes()))
    # A non-linear merge's virtual slot: factored parts on some layers (the LM head too),
    # dense on others.
    gen = torch.Generator().manual_seed(5)
    for name, layer in layers.items():
        out, inp = layer.out_features, layer.in_features
        if name.endswith(("q_proj", "v_proj", "up_proj", "lm_head")):
            layer.set_side(VIRTUAL, 0.3 * torch.randn(3, inp, generator=gen),
                           0.3 * torch.randn(out, 3, generator=gen))
        elif name.endswith(("k_proj", "down_proj")):
            layer.set_side(VIRTUAL, None, 0.05 * torch.randn(out, inp, generator=gen))
    lean = LeanDecoder(model, context)
    return root, model, pristine, context, bank, lean


def _ids(seed: int, length: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)
                         ).tolist()


def _full_logits(model, context, row, sequence: list[int]) -> torch.Tensor:
    """The reference: the transformers forward of the row alone, no cache, last position."""
    context.batch = BlendBatch.from_rows([row], torch.device("cpu"), torch.float32)
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([sequence])).logits[0, -1]
    finally:
        context.batch = None


class _Rows:
    """Rows in KV slots, prefilled alone by transformers, decoded together by the lean
    forward (the scheduler's decode step without the scheduler)."""

    def __init__(self, model, context, lean) -> None:
        config = model.config
        self.model, self.context, self.lean = model, context, lean
        self.pool = SlotPool(config.num_hidden_layers, config.num_key_value_heads,
                             CONFIG["head_dim"], 8, 64, torch.float32, torch.device("cpu"))
        self.rows: dict[int, tuple[list, list[int]]] = {}  # slot -> (mix, tokens)

    def join(self, slot: int, row: list, prompt: list[int]) -> None:
        self.pool.used[slot] = True
        self.context.batch = BlendBatch.from_rows([row], torch.device("cpu"), torch.float32)
        try:
            with torch.no_grad():
                out = self.model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True)
        finally:
            self.context.batch = None
        self.pool.write(slot, [(layer.keys[0], layer.values[0]) for layer in out.cache.layers])
        self.rows[slot] = (row, list(prompt))

    def leave(self, slot: int) -> None:
        self.pool.release(slot)
        del self.rows[slot]

    def step(self) -> dict[int, torch.Tensor]:
        """One decode step; each row's logits, and its greedy token appended."""
        hi = max(self.rows) + 1
        ids = torch.tensor([self.rows[s][1][-1] if s in self.rows else 0 for s in range(hi)])
        pos = torch.tensor([len(self.rows[s][1]) - 1 if s in self.rows else 0
                            for s in range(hi)])
        blend = BlendBatch.from_rows([self.rows[s][0] if s in self.rows else []
                                      for s in range(hi)], torch.device("cpu"), torch.float32)
        sampled = sorted(self.rows)
        _, lens = self.pool.begin_decode(hi, views=False)
        logits = self.lean.decode(ids, pos, self.pool.layers, lens, blend, sampled)
        self.pool.end_decode(hi)
        out = {}
        for i, s in enumerate(sampled):
            out[s] = logits[i]
            self.rows[s][1].append(int(logits[i].argmax()))
        return out


def _peft(root, pristine, mix: dict[str, float]):
    """PEFT's forward: one adapter alone, or a blend of several by 'cat' (exact)."""
    names = list(mix)
    net = PeftModel.from_pretrained(copy.deepcopy(pristine), root / names[0],
                                    adapter_name=names[0])
    for name in names[1:]:
        net.load_adapter(root / name, adapter_name=name)
    if len(names) > 1 or mix[names[0]] != 1.0:
        net.add_weighted_adapter(names, list(mix.values()), "mix", combination_type="cat")
        net.set_adapter("mix")
    return net.eval()


def test_decode_equals_transformers_and_peft_for_ragged_rows_joining_and_leaving(tiny):
    root, model, pristine, context, _, lean = tiny
    one, two, virt = (0, 1.0), (1, 1.0), (VIRTUAL, 1.0)
    mixes = {
        0: [], 1: [one], 2: [two], 4: [(0, 0.6), (1, 0.4)], 5: [virt],
        6: [(0, 0.5), (VIRTUAL, 0.5)],
    }  # slot 3 stays free: it decodes a pad token in between
    peft_mixes = {1: {"one": 1.0}, 2: {"two": 1.0}, 4: {"one": 0.6, "two": 0.4}}
    peft = {s: _peft(root, pristine, m) for s, m in peft_mixes.items()}
    rows = _Rows(model, context, lean)
    for slot, row in mixes.items():
        rows.join(slot, row, _ids(slot, 3 + 2 * slot))
    changed = 0
    for step in range(5):
        if step == 2:  # one row leaves, another joins its slot with another mix and length
            rows.leave(1)
            rows.join(1, [(1, 0.3), (0, 0.2)], _ids(11, 6))
            peft[1] = _peft(root, pristine, {"two": 0.3, "one": 0.2})
        got = rows.step()
        for slot, logits in got.items():
            row, tokens = rows.rows[slot]
            sequence = tokens[:-1]  # the step's token was appended
            reference = _full_logits(model, context, row, sequence)
            torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
            assert tokens[-1] == int(reference.argmax())
            if slot in peft:
                with torch.no_grad():
                    theirs = peft[slot](input_ids=torch.tensor([sequence])).logits[0, -1]
                torch.testing.assert_close(logits, theirs, atol=ATOL, rtol=0)
            base = _full_logits(model, context, [], sequence)
            changed += int((logits - base).abs().max() > 100 * ATOL)
    assert changed >= 20, "the adapters and the virtual slot must change the logits"


def test_ragged_rows_prefill_chunks_and_decode_tokens_in_one_forward(tiny):
    """`forward_rows`: prompt chunks of different lengths (one of them continuing an earlier
    chunk) and single decode tokens in one forward, each row with its mix: every token's
    logits within ATOL of the transformers forward of its row alone, no cache."""
    _, model, _, context, _, lean = tiny
    config = model.config
    pool = SlotPool(config.num_hidden_layers, config.num_key_value_heads, CONFIG["head_dim"],
                    6, 64, torch.float32, torch.device("cpu"))
    mixes = {0: [(0, 0.6), (1, 0.4)], 2: [(VIRTUAL, 1.0)], 3: [], 5: [(1, 1.0)]}
    sequences = {slot: _ids(20 + slot, 13) for slot in mixes}
    done = dict.fromkeys(mixes, 0)  # tokens of each row whose states are in its slot
    # Forward after forward: (slot, tokens) per row; single tokens are decode steps.
    plan = [[(0, 5), (2, 1), (3, 7)], [(0, 4), (2, 6), (5, 3), (3, 1)],
            [(5, 1), (0, 1), (2, 1), (3, 2)], [(3, 1), (5, 8), (0, 3)]]
    for forward in plan:
        rows = [(slot, done[slot], n) for slot, n in forward]
        ids = torch.tensor([t for slot, start, n in rows
                            for t in sequences[slot][start : start + n]])
        blend = BlendBatch.from_rows([mixes[slot] for slot, _, _ in rows],
                                     torch.device("cpu"), torch.float32)
        logits = lean.forward_rows(ids, pool.layers, rows, blend)
        t = 0
        for slot, start, n in rows:
            context.batch = BlendBatch.from_rows([mixes[slot]], torch.device("cpu"),
                                                 torch.float32)
            try:
                with torch.no_grad():
                    full = model(input_ids=torch.tensor([sequences[slot][: start + n]])
                                 ).logits[0, start:]
            finally:
                context.batch = None
            torch.testing.assert_close(logits[t : t + n], full, atol=ATOL, rtol=0)
            done[slot] += n
            t += n
    # The last tokens only (what a prefill samples), the head's LoRA included.
    rows = [(2, done[2], 2), (3, done[3], 1)]
    ids = torch.tensor(sequences[2][done[2] : done[2] + 2] + sequences[3][done[3] : done[3]
                                                                          + 1])
    blend = BlendBatch.from_rows([mixes[2], mixes[3]], torch.device("cpu"), torch.float32)
    last = lean.forward_rows(ids, pool.layers, rows, blend, sampled=[1, 2])
    for i, (slot, start, n) in enumerate(rows):
        expected = _full_logits(model, context, mixes[slot], sequences[slot][: start + n])
        torch.testing.assert_close(last[i], expected, atol=ATOL, rtol=0)


def test_one_row_alone_needs_no_mask(tiny):
    _, model, _, context, _, lean = tiny
    rows = _Rows(model, context, lean)
    rows.join(0, [(0, 0.7), (VIRTUAL, 0.3)], _ids(3, 9))
    for _ in range(3):
        (logits,) = rows.step().values()
        row, tokens = rows.rows[0]
        torch.testing.assert_close(logits, _full_logits(model, context, row, tokens[:-1]),
                                   atol=ATOL, rtol=0)


def test_weights_are_views_of_the_fused_tensors(tiny):
    """The model's own projections share the fused storage (no second copy), so the
    transformers forward and the lean one read the same weights."""
    _, model, pristine, _, _, lean = tiny
    attn = model.model.layers[0].self_attn
    fused = lean.layers[0].qkv.weight
    for module in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert module.base.weight.untyped_storage().data_ptr() == \
            fused.untyped_storage().data_ptr()
    original = pristine.model.layers[0].self_attn
    torch.testing.assert_close(attn.v_proj.base.weight, original.v_proj.weight, atol=0, rtol=0)


def test_a_broken_fused_layout_fails(tiny):
    """Swapping k's and v's columns of the fused weight must fail the comparison with an
    untouched reference (the pristine model, base rows)."""
    _, model, pristine, context, _, lean = tiny
    prompts = {0: _ids(4, 7), 1: _ids(5, 5)}

    def worst() -> float:
        rows = _Rows(model, context, lean)
        for slot, prompt in prompts.items():
            rows.join(slot, [], prompt)
        got = rows.step()
        with torch.no_grad():
            return max(float((got[s] - pristine(input_ids=torch.tensor([p])).logits[0, -1])
                             .abs().max()) for s, p in prompts.items())

    assert worst() < ATOL
    group, q, kv = lean.layers[0].qkv, lean.q_width, lean.kv_width
    saved = group.weight.clone()
    try:
        k = group.weight[:, q : q + kv].clone()
        group.weight[:, q : q + kv] = group.weight[:, q + kv :]
        group.weight[:, q + kv :] = k
        assert worst() > 100 * ATOL
    finally:
        group.weight.copy_(saved)


def test_unsupported_models_keep_the_transformers_forward():
    assert unsupported(tiny_model("llama")) is None
    assert "architecture" in unsupported(tiny_model("mistral"))
    assert "sliding" in unsupported(tiny_model("llama", sliding_window=4))
    assert "architecture" in unsupported(tiny_model("qwen2"))
    assert "bias" in unsupported(tiny_model("llama", attention_bias=True))
    with pytest.raises(ValueError, match="does not support"):
        LeanDecoder(tiny_model("gpt2"), BlendContext())


def _scheduler(engine, lean) -> Harness:
    h = Harness(engine, max_step_tokens=64)
    s = h.scheduler
    h.scheduler = Scheduler(s.model, s.context, s.tokenizer, s.eos_ids, s.model_lock,
                            s.max_batch_size, s.max_step_tokens, s.on_done, lean=lean)
    return h


def _joining_every_step(h, jobs, finished: tuple[str, ...]) -> list[tuple[list, list]]:
    """Add the jobs one per scheduler step (each joins while the others decode), run them out,
    and return each job's (token ids, logprobs)."""
    for job in jobs:
        h.add(job)
        h.scheduler.step()
    h.run()
    out = []
    for job in jobs:
        events = h.events(job)
        assert events[-1].finish_reason in finished, events[-1]
        out.append(([t for e in events for t in e.token_ids],
                    [lp.logprob for e in events for lp in e.logprobs]))
    return out


def test_scheduler_lean_equals_transformers_with_rows_joining_and_leaving(micro_engine):
    assert micro_engine.lean is not None, "the micro engine (a Llama) decodes lean by default"
    mixes = ["base", "math", "blend", "cooking", "travel", "blend", "math", "base"]
    texts = ["What is 7 plus 5?", "Give me a recipe with rice.", "Which sights in Oslo?"]
    results = []
    for lean in (micro_engine.lean, None):
        h = _scheduler(micro_engine, lean)
        jobs = [h.job(texts[i % 3], mix, max_tokens=4 + i, logprobs=0, ignore_eos=True)
                for i, mix in enumerate(mixes)]  # they leave at different steps
        results.append(_joining_every_step(h, jobs, ("length",)))
    lean_out, reference = results
    for (ids, lps), (ref_ids, ref_lps) in zip(lean_out, reference, strict=True):
        assert ids == ref_ids
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), rtol=0,
                                   atol=LOGPROB_ATOL)
    assert len({tuple(ids) for ids, _ in lean_out}) > 3, "mixes must change the outputs"


@pytest.mark.slow
def test_demo_eval_prompts_lean_equals_transformers(demo_engine):
    """The demo model and zoo: every task's first eval prompt, routed, under its own adapter,
    under a two-adapter blend and as base, rows joining every step: greedy tokens identical
    to the transformers decode path, logprobs within DEMO_LOGPROB_ATOL."""
    engine = demo_engine
    assert engine.lean is not None, "the demo base (Llama) decodes lean by default"
    specs = []
    for task in kv_demo.TASKS:
        text = kv_demo._eval_prompt(task)
        routed = _rounded(blend_for(AUTO_MODEL, engine.route(text),
                                    engine.settings.fallback_adapter),
                          engine.settings.blend_weight_step)
        specs += [(text, routed), (text, ((task, 1.0),)),
                  (text, (("arithmetic", 0.5), ("unit_convert", 0.5))), (text, ())]
    results = []
    for lean in (engine.lean, None):
        h = _scheduler(engine, lean)
        h.scheduler.pool = pool_for(engine.model, 8, 512)
        jobs = [h.job(text, blend=blend, max_tokens=12, logprobs=0) for text, blend in specs]
        results.append(_joining_every_step(h, jobs, ("stop", "length")))
    for (ids, lps), (ref_ids, ref_lps), spec in zip(*results, specs, strict=True):
        assert ids == ref_ids, spec
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), rtol=0,
                                   atol=DEMO_LOGPROB_ATOL)


@pytest.mark.parametrize(("path", "model_type", "device", "lean"), [
    ("auto", "llama", "cpu", True), ("auto", "qwen2", "cpu", False),
    ("auto", "llama", "cuda", False), ("transformers", "llama", "cpu", False),
    ("lean", "llama", "cpu", True), ("lean", "qwen2", "cpu", None),
])
def test_decode_path_setting(micro_settings, path, model_type, device, lean):
    """DYNAMERGE_DECODE_PATH: auto takes the lean path for a supported model on CPU; lean
    on an unsupported model fails the start-up with the reason (None: raises)."""
    engine = Engine(micro_settings.model_copy(update={"decode_path": path}))
    engine.model, engine.context = tiny_model(model_type), BlendContext()
    engine.device = torch.device(device)  # only read here; nothing runs on it
    if lean is None:
        with pytest.raises(ValueError, match="architecture"):
            engine._lean_decoder()
    else:
        assert (engine._lean_decoder() is not None) is lean
