"""A store larger than the device: 40 synthetic adapters on the micro base, 4 device slots.

Every adapter is served and answers exactly as PEFT does with that adapter alone; concurrent
mixes that together need more adapters than slots all complete, and no adapter a request uses
is ever evicted; the host and device budgets hold; broken adapters are skipped with a reason;
exemplar embeddings are cached across restarts.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from adapters.zoo.synth import synth_zoo
from app.engine.engine import Engine
from app.engine.types import GenerationRequest, SamplingParams
from app.settings import Settings
from router_index.embedder import Embedder

N_ADAPTERS = 40
SLOTS = 4


@pytest.fixture(scope="module")
def synth_store(micro_zoo, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("synth") / "store"
    synth_zoo(micro_zoo.base_dir, store, N_ADAPTERS, show_progress=False)
    return store


@pytest.fixture(scope="module")
def scale_settings(micro_zoo, synth_store, tmp_path_factory) -> Settings:
    one = (synth_store / "synth-0000" / "adapter_model.safetensors").stat().st_size * 2
    return Settings(
        base_model=micro_zoo.base_dir, adapter_store=synth_store,
        cache_dir=tmp_path_factory.mktemp("scale_cache"), max_adapters=SLOTS, top_k=2,
        max_virtual_adapters=1, host_adapter_bytes=6 * one, placement_timeout_s=60,
        max_queue=256,
    )


@pytest.fixture(scope="module")
def scale_engine(scale_settings) -> Engine:
    engine = Engine(scale_settings)
    engine.load(show_progress=False)
    yield engine
    engine.shutdown()


def _request(engine: Engine, text: str, **kw) -> GenerationRequest:
    return GenerationRequest(
        prompt=engine.render_chat([{"role": "user", "content": text}]), route_text=text,
        sampling=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), **kw,
    )


def _peft_greedy(base_dir: Path, adapter_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    """The reference: PEFT's own forward with that one adapter, greedy, no cache tricks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_every_adapter_of_a_store_larger_than_the_device_answers_as_peft(
        scale_engine, micro_zoo, synth_store):
    engine = scale_engine
    assert len(engine.adapter_ids()) == N_ADAPTERS > SLOTS
    order = list(engine.adapter_ids())
    random.Random(1).shuffle(order)
    streams = {a: engine.submit(_request(engine, "Tell me something.", model=a)) for a in order}
    ids = engine.tokenizer(engine.render_chat([{"role": "user", "content": "Tell me something."}]),
                           add_special_tokens=False)["input_ids"]
    for adapter_id, stream in streams.items():
        text, final = stream.result()
        assert final.finish_reason == "length"
        expected = _peft_greedy(micro_zoo.base_dir, synth_store / adapter_id, ids, 6)
        assert engine.tokenizer.decode(expected, skip_special_tokens=True) == text, adapter_id
    assert len(engine.slots.resident("adapter")) <= SLOTS
    assert engine.host.stats().bytes <= engine.settings.host_adapter_bytes


def test_concurrent_mixes_needing_more_adapters_than_slots(scale_engine):
    """16 clients, each a mix of two of the 40 adapters: every step checks that each running
    request's slots still hold its own adapters (an in-use eviction would fail it), and the
    outputs equal the same requests run one at a time."""
    engine = scale_engine
    rng = random.Random(7)
    mixes = [tuple((a, w) for a, w in zip(rng.sample(engine.adapter_ids(), 2), (0.7, 0.3),
                                          strict=True)) for _ in range(24)]
    requests = [_request(engine, f"Question {i}?", mix=m) for i, m in enumerate(mixes)]
    expected = [engine.submit(r).result()[0] for r in requests]

    scheduler, violations = engine.scheduler, []
    original = scheduler.step

    def checked_step() -> None:
        with engine.residency._lock:
            for active in scheduler.prefilling + scheduler.running:
                held = [engine.slots._slots[s].adapter_id for s, _ in active.job.rows]
                wanted = [a for a, _ in active.job.stream.admission.blend]
                if held != wanted:
                    violations.append((wanted, held))
                if any(engine.slots._slots[s].refs < 1 for s, _ in active.job.rows):
                    violations.append(("unpinned", wanted))
        original()

    scheduler.step = checked_step
    try:
        results: dict[int, str] = {}

        def client(i: int) -> None:
            results[i] = engine.submit(requests[i]).result()[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        scheduler.step = original
    assert not violations
    assert [results[i] for i in range(len(requests))] == expected
    with engine.residency._lock:
        assert all(engine.slots.refs(a) == 0 for a in engine.slots.resident())
    assert engine.stats().running == engine.stats().queued == 0


def test_a_request_that_cannot_be_placed_in_time_gets_a_placement_error(scale_engine):
    """Every slot busy with a long request: a request for a fifth adapter waits, then fails
    with AdapterPlacementError (503) at the timeout; once the slots free up it is served."""
    from app.engine.types import AdapterPlacementError

    engine = scale_engine
    busy_ids, newcomer = engine.adapter_ids()[:SLOTS], engine.adapter_ids()[SLOTS + 3]
    timeout = engine.residency.timeout_s
    for adapter_id in busy_ids:  # resident first, so that admission pins them at once
        engine.submit(_request(engine, "Hi", model=adapter_id)).result()
    engine.residency.timeout_s = 0.5
    try:
        with engine.model_lock:  # the worker cannot finish the long requests meanwhile
            long = [engine.submit(_request(engine, "Hi", model=a)) for a in busy_ids]
            assert all(s._settled.is_set() for s in long)  # placed: their slots are pinned
            late = engine.submit(_request(engine, "Hi", model=newcomer))
            deadline = time.monotonic() + 10
            while engine.residency.waiting and time.monotonic() < deadline:
                time.sleep(0.05)  # the loader gives up on it at its timeout
            assert engine.residency.waiting == 0
            assert all(s.final is None for s in long)  # while they were still running
        _, final = late.result()
        assert final.finish_reason == "error"
        assert isinstance(final.error, AdapterPlacementError)
        for stream in long:
            assert stream.result()[1].finish_reason == "length"
    finally:
        engine.residency.timeout_s = timeout
    assert engine.submit(_request(engine, "Hi", model=newcomer)).result()[1].finish_reason \
        == "length"


def test_pinned_adapters_stay_on_the_device(micro_zoo, synth_store, tmp_path):
    engine = Engine(Settings(base_model=micro_zoo.base_dir, adapter_store=synth_store,
                             cache_dir=tmp_path / "cache", max_adapters=2, top_k=1,
                             pinned_adapters=["synth-0009"]))
    engine.load(show_progress=False)
    try:
        for adapter_id in engine.adapter_ids()[:6]:
            engine.submit(_request(engine, "Hi", model=adapter_id)).result()
        assert "synth-0009" in engine.slots.resident("adapter")
        info = {a.id: a for a in engine.adapters()}["synth-0009"]
        assert info.tier == "device" and info.pinned and info.requests == 0
    finally:
        engine.shutdown()


def test_routing_scores_every_adapter_of_the_store(scale_engine, synth_store):
    engine = scale_engine
    prompt = json.loads((synth_store / "synth-0007" / "eval.jsonl").read_text().splitlines()[0])
    decision = engine.route(prompt["prompt"])
    assert len(decision.scores) == N_ADAPTERS
    assert decision.hits and decision.hits[0].adapter_id == "synth-0007"


def test_tiers_are_listed_and_exported(scale_engine):
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from app.main import create_app

    engine = scale_engine
    settings = engine.settings.model_copy(update={"admin_key": SecretStr("adm")})
    with TestClient(create_app(settings, engine)) as client:
        models = client.get("/v1/models").json()["data"]
        assert len(models) == N_ADAPTERS + 2
        listing = client.get("/v1/adapters", headers={"Authorization": "Bearer adm"}).json()
        tiers = {a["id"]: a["tier"] for a in listing["data"]}
        assert len(tiers) == N_ADAPTERS
        assert sum(t == "device" for t in tiers.values()) <= SLOTS
        assert {"device", "disk"} <= set(tiers.values())
        text = client.get("/metrics").text
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and f'max_lora="{SLOTS}"' in info[0]
    assert 'dynamerge_adapter_resident{adapter="' in text
    assert 'dynamerge_tier_adapters{tier="disk"} 40.0' in text


def test_broken_adapters_are_skipped_with_a_reason(micro_zoo, synth_store, tmp_path):
    store = tmp_path / "store"
    for name in ("synth-0001", "synth-0002"):
        shutil.copytree(synth_store / name, store / name)
    dora = store / "synth-0002" / "adapter_config.json"
    dora.write_text(json.dumps({**json.loads(dora.read_text()), "use_dora": True}))
    shutil.copytree(synth_store / "synth-0003", store / "wrong-shape")
    from safetensors.torch import load_file, save_file

    weights = store / "wrong-shape" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], 7, dtype=tensors[key].dtype)
    save_file(tensors, weights)
    (store / "empty").mkdir()
    (store / "empty" / "adapter_config.json").write_text("{not json")
    engine = Engine(Settings(base_model=micro_zoo.base_dir, adapter_store=store,
                             cache_dir=tmp_path / "cache", max_adapters=2, top_k=1))
    engine.load(show_progress=False)
    try:
        assert engine.adapter_ids() == ["synth-0001"]
        refused = {r.id: r.reason for r in engine.refused_adapters()}
        assert set(refused) == {"synth-0002", "wrong-shape", "empty"}
        assert "DoRA" in refused["synth-0002"]
        assert "base expects" in refused["wrong-shape"]
        assert "not JSON" in refused["empty"]
        assert str(tmp_path) not in " ".join(refused.values())  # no server paths
    finally:
        engine.shutdown()


def test_exemplar_embeddings_are_cached_across_restarts(micro_zoo, synth_store, tmp_path,
                                                        monkeypatch):
    store = tmp_path / "store"
    for i in range(5):
        shutil.copytree(synth_store / f"synth-{i:04d}", store / f"synth-{i:04d}")
    settings = Settings(base_model=micro_zoo.base_dir, adapter_store=store,
                        cache_dir=tmp_path / "cache", max_adapters=2, top_k=1,
                        calibration="off")  # only the index build embeds
    calls: list[int] = []
    encode = Embedder.encode

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(Embedder, "encode", counting)

    def start() -> list[int]:
        calls.clear()
        engine = Engine(settings)
        engine.load(show_progress=False)
        scores = engine.route("What are common beginner mistakes?").scores
        engine.shutdown()
        assert len(scores) == 5
        return [n for n in calls if n > 1]  # the index build (a route embeds one text)

    first = start()
    assert len(first) == 5  # every adapter embedded
    assert start() == []  # a warm start reads every entry
    exemplars = store / "synth-0003" / "exemplars.jsonl"
    exemplars.write_text(exemplars.read_text() + json.dumps({"text": "A new one."}) + "\n")
    again = start()
    assert len(again) == 1  # only the changed adapter is embedded again
