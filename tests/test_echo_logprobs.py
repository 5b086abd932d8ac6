"""`echo` with prompt logprobs on /v1/completions (what lm-eval's loglikelihood requests send:
echo, logprobs, max_tokens 0 or 1, temperature 0), against references computed outside the
engine: a plain transformers forward for the base, PEFT's forward for a named adapter, and
W + sum_i w_i * (PEFT's delta of adapter i) for a routed blend. Tolerance: 1e-4 absolute
(fp32 on CPU; the engine prefills in chunks and batches, the references in one pass)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import openai
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from server import LiveServer
from transformers import AutoModelForCausalLM

from adapters.zoo.micro import MicroZoo
from app.engine.engine import Engine
from app.main import create_app

ATOL = 1e-4
PROMPT = "What is 2 plus 3? Add the numbers, then check the sum twice."


@pytest.fixture(scope="module")
def client(micro_engine: Engine) -> Iterator[openai.OpenAI]:
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def _ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def _base(zoo: MicroZoo) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(zoo.base_dir, dtype=torch.float32).eval()


def _blended(zoo: MicroZoo, blend: list[tuple[str, float]]) -> torch.nn.Module:
    """The dense reference of a linear blend: each adapter's delta from PEFT, weighted."""
    model = PeftModel.from_pretrained(_base(zoo), zoo.store_dir / blend[0][0],
                                      adapter_name=blend[0][0])
    for adapter, _ in blend[1:]:
        model.load_adapter(zoo.store_dir / adapter, adapter_name=adapter)
    dense = _base(zoo)
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                delta = sum(w * module.get_delta_weight(a) for a, w in blend
                            if a in module.lora_A)
                dense.get_submodule(name).weight += delta
    return dense


def _reference(model: torch.nn.Module, ids: list[int], k: int) -> tuple[list[float], list]:
    """Each prompt token's logprob given the tokens before it (from the second on), and the
    ids of the k best alternatives at each position."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    chosen = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return chosen.tolist(), logprobs[:-1].topk(k, dim=-1).indices.tolist()


def _echo(client: openai.OpenAI, model: str, prompt: str | list[int], k: int = 2,
          max_tokens: int = 0, **extra: object):
    return client.completions.create(model=model, prompt=prompt, echo=True, logprobs=k,
                                     max_tokens=max_tokens, temperature=0, **extra)


def _check(engine: Engine, choice, ids: list[int], reference: tuple[list[float], list],
           k: int = 2) -> None:
    logprobs = choice.logprobs
    n = len(ids)
    assert logprobs.tokens[:n] == engine.token_strings(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    want, best = reference
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:n]), torch.tensor(want),
                               atol=ATOL, rtol=0)
    for top, ids_k in zip(logprobs.top_logprobs[1:n], best, strict=True):
        assert len(ids_k) == k  # (two tokens that read the same share one key of the dict)
        assert set(top) == set(engine.token_strings(ids_k))


def test_base_prompt_logprobs_equal_a_transformers_forward(
    client: openai.OpenAI, micro_engine: Engine, micro_zoo: MicroZoo
) -> None:
    ids = _ids(micro_engine, PROMPT)
    done = _echo(client, "base", PROMPT)
    (choice,) = done.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert done.usage.completion_tokens == 0 and done.usage.prompt_tokens == len(ids)
    assert len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.text_offset[0] == 0
    _check(micro_engine, choice, ids, _reference(_base(micro_zoo), ids, 2))


def test_named_adapter_prompt_logprobs_equal_peft(
    client: openai.OpenAI, micro_engine: Engine, micro_zoo: MicroZoo
) -> None:
    adapter = micro_zoo.adapter_ids[0]
    ids = _ids(micro_engine, PROMPT)
    peft = PeftModel.from_pretrained(_base(micro_zoo), micro_zoo.store_dir / adapter).eval()
    (choice,) = _echo(client, adapter, ids).choices  # token ids, as lm-eval sends
    assert choice.text == micro_engine.tokenizer.decode(ids)
    _check(micro_engine, choice, ids, _reference(peft, ids, 2))


def test_routed_blend_prompt_logprobs_equal_the_dense_blend(
    client: openai.OpenAI, micro_engine: Engine, micro_zoo: MicroZoo
) -> None:
    """max_tokens 1, as lm-eval sends: the prompt's logprobs, then the generated token's."""
    prompt = micro_zoo.exemplars(micro_zoo.adapter_ids[0])[0]
    ids = _ids(micro_engine, prompt)
    raw = client.completions.with_raw_response.create(
        model="auto", prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0,
        extra_body={"routing": {"top_k": 2}})
    done = raw.parse()
    blend = [(a["id"], a["weight"]) for a in done.model_extra["routing"]["adapters"]]
    assert len(blend) == 2, blend  # a real blend, not one adapter
    (choice,) = done.choices
    assert len(choice.logprobs.tokens) == len(ids) + 1 and done.usage.completion_tokens == 1
    model = _blended(micro_zoo, blend)
    _check(micro_engine, choice, ids, _reference(model, ids, 1), k=1)
    # The generated token is the greedy one, with its own logprob after the prompt's.
    with torch.no_grad():
        last = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(float(last.max()), abs=ATOL)
    assert choice.text == prompt + micro_engine.tokenizer.decode([int(last.argmax())])


def test_chunked_and_batched_prefill_give_the_same_prompt_logprobs(
    client: openai.OpenAI, micro_engine: Engine
) -> None:
    """A prompt longer than a step's token budget (prefilled in chunks), beside other rows,
    and again after the prefix cache has seen it: the same logprobs each time."""
    prompt = " ".join([PROMPT] * 4)
    alone = _echo(client, "base", prompt).choices[0].logprobs
    scheduler = micro_engine.scheduler
    budget = scheduler.max_step_tokens
    scheduler.max_step_tokens = 16  # the smallest budget the settings allow
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_echo, client, "base", prompt),
                       pool.submit(client.completions.create, model="base", prompt=prompt,
                                   max_tokens=4),
                       pool.submit(_echo, client, micro_engine.adapter_ids()[1], PROMPT)]
            chunked = futures[0].result().choices[0].logprobs
            for future in futures[1:]:
                future.result()
    finally:
        scheduler.max_step_tokens = budget
    assert len(_ids(micro_engine, prompt)) > 16
    assert chunked.tokens == alone.tokens
    torch.testing.assert_close(torch.tensor(chunked.token_logprobs[1:]),
                               torch.tensor(alone.token_logprobs[1:]), atol=ATOL, rtol=0)


def test_echo_without_logprobs_and_streamed(client: openai.OpenAI) -> None:
    done = client.completions.create(model="base", prompt=PROMPT, echo=True, max_tokens=3,
                                     temperature=0)
    (choice,) = done.choices
    plain = client.completions.create(model="base", prompt=PROMPT, max_tokens=3,
                                      temperature=0).choices[0]
    assert choice.text == PROMPT + plain.text and choice.logprobs is None
    whole = _echo(client, "base", PROMPT, max_tokens=3)
    chunks = list(_echo(client, "base", PROMPT, max_tokens=3, stream=True))
    texts = "".join(c.text for chunk in chunks for c in chunk.choices)
    assert texts == whole.choices[0].text
    tokens = [t for chunk in chunks for c in chunk.choices if c.logprobs
              for t in c.logprobs.tokens]
    assert tokens == whole.choices[0].logprobs.tokens
    offsets = [o for chunk in chunks for c in chunk.choices if c.logprobs
               for o in c.logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset


def test_max_tokens_zero_needs_echo(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="base", prompt=PROMPT, max_tokens=0)
    assert err.value.body["param"] == "max_tokens" and "echo" in err.value.body["message"]
