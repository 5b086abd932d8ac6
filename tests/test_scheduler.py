"""Continuous batching: a request's output does not depend on which others share its batch."""

from __future__ import annotations

import threading

import torch

from adapters.zoo.micro import topic_prompts
from app import metrics
from app.engine.batch_cache import RowCache, split_rows, stack_rows
from app.engine.blended_lora import BlendBatch
from app.engine.types import GenerationRequest, SamplingParams


def _batched_steps() -> float:
    """Decode steps so far that carried more than one sequence."""
    buckets = {s.labels["le"]: s.value for s in metrics.BATCH_SIZE.collect()[0].samples
               if s.name.endswith("_bucket")}
    return buckets["+Inf"] - buckets["1.0"]


def _requests(engine) -> list[GenerationRequest]:
    """Different mixes (routed, base, forced), prompt lengths and lengths of output."""
    prompts = [
        topic_prompts("math", 1, 1000)[0],
        topic_prompts("cooking", 1, 1001)[0] + " Please explain it in great detail, step by step.",
        "Hi",
        topic_prompts("travel", 1, 1002)[0],
        topic_prompts("math", 1, 1003)[0],
        topic_prompts("cooking", 1, 1004)[0],
    ]
    models = ["auto", "auto", "base", "travel", "cooking", "auto"]
    return [
        GenerationRequest(
            prompt=engine.render_chat([{"role": "user", "content": p}]),
            route_text=p,
            model=m,
            routing=engine.router.options(top_k=2 + i % 2, threshold=-1.0),
            sampling=SamplingParams(max_tokens=6 + 3 * i, temperature=0.0),
        )
        for i, (p, m) in enumerate(zip(prompts, models, strict=True))
    ]


def _reference_greedy(engine, request: GenerationRequest, blend) -> str:
    """Greedy decoding by recomputing the whole sequence each step: no KV cache, no batch."""
    ids = engine.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
    rows = [[(engine.slots.slot_of(a), w) for a, w in blend]]
    generated: list[int] = []
    for _ in range(request.sampling.max_tokens):
        with engine.model_lock, torch.inference_mode():
            engine.context.batch = BlendBatch.from_rows(rows, engine.device, engine.dtype)
            try:
                logits = engine.model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
            finally:
                engine.context.batch = None
        token = int(logits.argmax())
        if token in engine.eos_ids:
            break
        generated.append(token)
    return engine.tokenizer.decode(generated, skip_special_tokens=True)


def test_greedy_outputs_identical_alone_and_in_a_mixed_batch(micro_engine):
    requests = _requests(micro_engine)
    alone_streams = [micro_engine.submit(r) for r in requests[:1]]
    alone = []
    for r in requests:
        stream = micro_engine.submit(r)
        alone.append(stream.result()[0])
        assert alone[-1] == _reference_greedy(micro_engine, r, stream.admission.blend)
    del alone_streams
    before = _batched_steps()
    streams = [micro_engine.submit(r) for r in requests]
    together = [s.result()[0] for s in streams]
    assert _batched_steps() > before, "the requests were never batched together"
    assert together == alone
    assert len({s.admission.blend for s in streams}) >= 5  # the mixes really differ


def test_requests_join_a_running_batch(micro_engine):
    """A request submitted while others decode joins them mid-flight, with the same output."""
    requests = _requests(micro_engine)
    alone = micro_engine.submit(requests[3]).result()[0]
    long_running = micro_engine.submit(
        GenerationRequest(requests[0].prompt, requests[0].route_text,
                          sampling=SamplingParams(max_tokens=60, temperature=0.0))
    )
    first = next(iter(long_running))  # the long request is decoding now
    late = micro_engine.submit(requests[3]).result()[0]
    rest = "".join(e.text for e in long_running)
    assert late == alone
    assert first.finish_reason is None and rest is not None


def test_sixteen_concurrent_clients_complete(micro_engine):
    requests = _requests(micro_engine)
    expected = {r.prompt: micro_engine.submit(r).result()[0] for r in requests}
    results: dict[int, tuple[str, str]] = {}

    def client(i: int) -> None:
        request = requests[i % len(requests)]
        results[i] = (request.prompt, micro_engine.submit(request).result()[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 16
    assert all(text == expected[prompt] for prompt, text in results.values())


def test_stacked_rows_split_back_unchanged():
    rows = [RowCache([(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4))],
                     torch.ones(n, dtype=torch.long)) for n in (2, 5)]
    cache, mask = stack_rows([rows[0], None, rows[1]], torch.device("cpu"))
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0] * 5, [1] * 5]
    back = split_rows(cache, mask)
    for original, again in zip([rows[0], rows[1]], [back[0], back[2]], strict=True):
        torch.testing.assert_close(again.layers[0][0], original.layers[0][0], rtol=0, atol=0)
        assert again.mask.tolist() == original.mask.tolist()
