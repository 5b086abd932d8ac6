"""The engine on the micro zoo: generation options, cancellation, limits, live adapters."""

from __future__ import annotations

import shutil

import pytest

from adapters.zoo.micro import topic_prompts
from app.engine.detokenize import IncrementalText
from app.engine.types import ContextLengthExceededError, GenerationRequest, SamplingParams


def _request(engine, text, **sampling):
    return GenerationRequest(
        prompt=engine.render_chat([{"role": "user", "content": text}]),
        route_text=text,
        sampling=SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **sampling}),
    )


def _run(engine, request):
    return engine.submit(request).result()


def test_greedy_is_deterministic_and_counts_tokens(micro_engine):
    request = _request(micro_engine, "What is 3 plus 4?")
    text, final = _run(micro_engine, request)
    again, _ = _run(micro_engine, request)
    assert text == again
    assert final.finish_reason in ("length", "stop")
    assert final.completion_tokens <= 8 and final.prompt_tokens > 5


def test_seeded_sampling_repeats_and_seeds_differ(micro_engine):
    req = lambda seed: _request(micro_engine, "Hello", temperature=1.0, seed=seed, max_tokens=12)  # noqa: E731
    first, second = _run(micro_engine, req(1))[0], _run(micro_engine, req(1))[0]
    assert first == second
    others = {_run(micro_engine, req(seed))[0] for seed in range(2, 6)}
    assert len(others | {first}) > 1


def test_max_tokens_gives_length(micro_engine):
    _, final = _run(micro_engine, _request(micro_engine, "Hi", max_tokens=3))
    assert final.completion_tokens <= 3
    if final.completion_tokens == 3:
        assert final.finish_reason == "length"


def test_stop_string_cuts_the_text(micro_engine):
    text, _ = _run(micro_engine, _request(micro_engine, "Tell me", max_tokens=24))
    if len(text) < 4:
        pytest.skip("the random model stopped too early to place a stop string")
    stop = text[2:4]
    cut, final = _run(micro_engine, _request(micro_engine, "Tell me", max_tokens=24, stop=(stop,)))
    assert final.finish_reason == "stop"
    assert cut == text[: text.find(stop)]


def test_models_auto_base_and_named(micro_engine):
    prompt = topic_prompts("cooking", 1, offset=1000)[0]
    request = _request(micro_engine, prompt)
    auto = micro_engine.submit(request)
    auto.result()
    assert auto.admission.blend[0][0] == "cooking"
    base = micro_engine.submit(GenerationRequest(request.prompt, prompt, model="base"))
    base.result()
    assert base.admission.blend == () and base.admission.decision is None
    named = micro_engine.submit(GenerationRequest(request.prompt, prompt, model="travel"))
    named.result()
    assert named.admission.blend == (("travel", 1.0),)


def test_context_length_is_enforced(micro_engine):
    long_text = "word " * micro_engine.context_length
    with pytest.raises(ContextLengthExceededError, match="maximum context length"):
        micro_engine.submit(_request(micro_engine, long_text))


def test_cancel_stops_generation(micro_engine):
    stream = micro_engine.submit(_request(micro_engine, "Hi", max_tokens=200))
    stream.cancel()
    _, final = stream.result()
    assert final.finish_reason == "cancelled"
    assert final.completion_tokens < 200


def test_register_and_unregister_live(micro_zoo, micro_engine):
    shutil.copytree(micro_zoo.store_dir / "travel", micro_zoo.store_dir / "voyage")
    try:
        prompt = topic_prompts("travel", 1, offset=1000)[0]
        micro_engine.register_adapter("voyage")
        assert "voyage" in micro_engine.models()
        decision = micro_engine.route(prompt, micro_engine.router.options(top_k=2))
        assert {h.adapter_id for h in decision.hits} == {"travel", "voyage"}
        micro_engine.unregister_adapter("voyage")
        assert "voyage" not in micro_engine.models()
        assert "voyage" not in micro_engine.route(prompt).scores
    finally:
        shutil.rmtree(micro_zoo.store_dir / "voyage")


def test_unregister_waits_for_requests_in_flight(micro_zoo, micro_engine):
    """A running request keeps its adapter's slot until it finishes; new ones can't use it."""
    shutil.copytree(micro_zoo.store_dir / "math", micro_zoo.store_dir / "maths")
    try:
        micro_engine.register_adapter("maths")
        request = _request(micro_engine, "What is 2 plus 2?", max_tokens=16)
        alone, _ = _run(micro_engine, GenerationRequest(request.prompt, "x", model="maths",
                                                        sampling=request.sampling))
        stream = micro_engine.submit(GenerationRequest(request.prompt, "x", model="maths",
                                                       sampling=request.sampling))
        micro_engine.unregister_adapter("maths")
        assert "maths" not in micro_engine.models()
        text, _ = stream.result()
        assert text == alone
        assert "maths" not in micro_engine.slots  # its slot was freed once the request left
    finally:
        shutil.rmtree(micro_zoo.store_dir / "maths")


class _CharTokenizer:
    """Decodes ids as characters: enough to test the incremental text logic in isolation."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _feed(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    inc = IncrementalText(_CharTokenizer(), stop)
    deltas = []
    for ch in text:
        deltas.append(inc.add(ord(ch)))
        if inc.stopped:
            break
    deltas.append(inc.flush())
    return deltas, inc.stopped


def test_incremental_text_holds_back_partial_stops():
    deltas, stopped = _feed("abc<EN>def<END>tail", ("<END>",))
    assert stopped and "".join(deltas) == "abc<EN>def"
    assert "<" not in deltas[3]  # "<" was held back while it could start "<END>"
    deltas, stopped = _feed("plain text", ("zz",))
    assert not stopped and "".join(deltas) == "plain text"


def test_token_bytes_join_into_the_text_even_inside_a_character(micro_engine):
    text = "héllo wörld ✓ naïve"
    ids = micro_engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = micro_engine.token_bytes(ids)
    assert b"".join(pieces).decode() == text
    # The case is real: decoded one by one, some tokens are halves of a character.
    assert "".join(micro_engine.token_strings(ids)) != text
