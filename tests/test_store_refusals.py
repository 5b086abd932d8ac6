"""A store and base as users bring them, through the real engine and server on loopback.

The base is the micro model with its chat template taken away (a base checkpoint as GPT-2's
or OPT's are shipped); the store holds the micro adapters plus a DoRA adapter made by PEFT.
Defect 4: a refused adapter answered 404 "does not exist"; defect 8: such a base could not
start at all.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator

import openai
import pytest
from peft import LoraConfig, get_peft_model
from pydantic import SecretStr
from server import LiveServer
from transformers import AutoModelForCausalLM

from app.engine.engine import Engine
from app.main import create_app

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def server(micro_zoo, micro_settings, tmp_path_factory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("plain")
    base, store = root / "base", root / "store"
    shutil.copytree(micro_zoo.base_dir, base)
    config = base / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                  if k != "chat_template"}))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    shutil.copytree(micro_zoo.store_dir / "math", store / "math")
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, target_modules=["v_proj"], use_dora=True))
    dora.save_pretrained(store / "v_dora")
    shutil.copy(micro_zoo.store_dir / "math" / "exemplars.jsonl", store / "v_dora")
    settings = micro_settings.model_copy(update={
        "base_model": base, "adapter_store": store, "admin_key": SecretStr(ADMIN),
    })
    engine = Engine(settings)
    logger = logging.getLogger("adapters.store")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        engine.load(show_progress=False)
    finally:
        logger.removeHandler(handler)
    assert engine.tokenizer.chat_template is None
    assert any("v_dora" in r.getMessage() and "DoRA" in r.getMessage() for r in records)
    try:
        with LiveServer(create_app(settings, engine)) as live:
            yield live
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_refused_adapter_answers_409_with_its_reason(client):
    with pytest.raises(openai.ConflictError) as info:
        client.completions.create(model="v_dora", prompt="hello", max_tokens=2)
    error = info.value.body
    assert error["code"] == "adapter_refused" and error["param"] == "model"
    assert "DoRA" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="v_nothing", prompt="hello", max_tokens=2)


def test_models_stay_the_servable_set_and_admin_lists_refusals(client, server):
    assert {m.id for m in client.models.list()} == {"auto", "base", "math"}
    with server.client(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        listing = http.get("/v1/adapters").json()
    refused = {r["id"]: r["reason"] for r in listing["refused"]}
    assert "DoRA" in refused["v_dora"]


def test_base_without_chat_template_serves_completions_and_refuses_chat(client):
    done = client.completions.create(model="math", prompt="what is two plus", max_tokens=3,
                                     temperature=0)
    assert done.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="math", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in info.value.body["message"]
