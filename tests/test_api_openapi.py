"""The OpenAPI document tells the truth: the limits this app enforces, the statuses each
operation can return with the error envelope, which key each needs, what /metrics and the
probes return; and no error message reveals a server path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from server import LiveServer

from app.api.errors import error_body
from app.engine.engine import Engine
from app.engine.types import EngineDeadError
from app.main import create_app

KEY = "sk-doc"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def server(micro_engine: Engine) -> Iterator[LiveServer]:
    settings = micro_engine.settings.model_copy(update={
        "api_key": SecretStr(KEY), "max_tokens_limit": 64, "default_max_tokens": 8,
        "max_n": 4, "max_adapters": 5, "max_body_bytes": 4096})
    with LiveServer(create_app(settings, micro_engine)) as live:
        yield live


@pytest.fixture(scope="module")
def doc(server: LiveServer) -> dict:
    with server.client() as http:
        assert http.get("/openapi.json").status_code == 401  # the document needs the key too
        response = http.get("/openapi.json", headers=AUTH)
    assert response.status_code == 200
    return response.json()


def _integer(schema: dict) -> dict:
    return next(b for b in schema.get("anyOf", [schema]) if b.get("type") == "integer")


def _operations(doc: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_the_settings_maxima_are_in_the_document_and_enforced(
    doc: dict, server: LiveServer
) -> None:
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "GenerateRequest"):
        props = schemas[name]["properties"]
        assert _integer(props["max_tokens"])["maximum"] == 64
        assert _integer(props["max_completion_tokens"])["maximum"] == 64
    assert _integer(schemas["ChatCompletionRequest"]["properties"]["n"])["maximum"] == 4
    top_k = _integer(schemas["RoutingParams"]["properties"]["top_k"])
    assert top_k["maximum"] == 5 and top_k["minimum"] == 1  # bounds as JSON Schema spells them
    assert "'ge':" not in str(schemas) and "'le':" not in str(schemas)  # raw pydantic keys
    bias = schemas["ChatCompletionRequest"]["properties"]["logit_bias"]["anyOf"][0]
    assert bias["additionalProperties"] is False and bias["patternProperties"]
    assert _integer(schemas["EmbeddingRequest"]["properties"]["dimensions"])["enum"] == [384]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["temperature"]["anyOf"][0] | {"type": "number"} == {
        "type": "number", "minimum": 0, "maximum": 2}
    assert "4096 bytes" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]["413"][
        "description"]
    hi = [{"role": "user", "content": "Hi"}]
    with server.client(headers=AUTH) as http:
        def chat_status(**fields: object) -> int:
            return http.post("/v1/chat/completions", json={
                "model": "base", "messages": hi, "max_tokens": 1, **fields}).status_code

        assert chat_status(n=4) == 200 and chat_status(n=5) == 400
        assert chat_status(max_tokens=64) == 200 and chat_status(max_tokens=65) == 400
        assert chat_status(model="auto", routing={"top_k": 5}) == 200
        assert chat_status(model="auto", routing={"top_k": 6}) == 400


def test_every_error_status_is_declared_with_the_envelope(doc: dict) -> None:
    assert "HTTPValidationError" not in str(doc)  # FastAPI's 422 shape is never sent
    for method, path, operation in _operations(doc):
        codes = operation["responses"]
        for status, response in codes.items():
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == ENVELOPE, (
                    method, path, status)
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], (method, path)
        if path.startswith("/v1/adapters"):  # no admin key here: everyone gets 403
            assert "403" in codes and "401" not in codes, (method, path)
            assert "security" not in operation
        elif path.startswith("/v1/"):
            assert "401" in codes and operation["security"] == [{"apiKey": []}], (method, path)
        if method == "POST":
            assert {"400", "413"} <= set(codes), (method, path)
    generation = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "500", "503"} <= set(generation)
    assert "422" not in generation  # a wrong type is a 400, as OpenAI answers
    assert set(generation["200"]["content"]) == {"application/json", "text/event-stream"}
    event = generation["200"]["content"]["text/event-stream"]["schema"]  # one event (3.1)
    assert event["type"] == "object" and event["properties"]["data"]["type"] == "string"
    assert "x-dynamerge-adapters" in generation["200"]["headers"]
    delete = doc["paths"]["/v1/adapters/{adapter_id}"]["delete"]["responses"]
    assert "422" not in delete  # a string path parameter cannot fail validation


def test_probes_and_metrics_are_documented_as_they_answer(doc: dict, server: LiveServer) -> None:
    paths = doc["paths"]
    metrics = paths["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"]
    health = paths["/health"]["get"]["responses"]
    assert {"500", "503"} <= set(health)
    assert health["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HealthResponse"}
    ready = doc["components"]["schemas"]["ReadyResponse"]["properties"]
    assert ready["adapters"]["type"] == "integer"
    with server.client() as http:
        assert http.get("/metrics").headers["content-type"].startswith("text/plain")
        assert isinstance(http.get("/ready").json()["adapters"], int)


def test_links_describe_the_adapter_lifecycle(doc: dict) -> None:
    register = doc["paths"]["/v1/adapters"]["post"]["responses"]["201"]["links"]
    assert set(register) == {"UseAdapter", "DeleteAdapter"}
    deleted = doc["paths"]["/v1/adapters/{adapter_id}"]["delete"]["responses"]["200"]["links"]
    assert set(deleted) == {"UseDeletedAdapter", "RegisterAgain"}


def test_no_server_path_in_any_error_message(micro_engine: Engine, tmp_path: Path) -> None:
    secret = tmp_path / "private" / "base"
    status, body = error_body(EngineDeadError(f"OSError: cannot read {secret}/model.bin"))
    assert status == 503 and str(tmp_path) not in body["error"]["message"]
    assert "<server path>" in body["error"]["message"]
    # Loading fails on a base model that is not there: /health says so, not where.
    settings = micro_engine.settings.model_copy(update={
        "base_model": secret, "cache_dir": tmp_path / "cache"})
    with TestClient(create_app(settings)) as client:
        for _ in range(200):
            response = client.get("/health")
            if response.status_code != 200:
                break
            time.sleep(0.05)  # loading runs in a thread
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "load_failed"
        assert str(tmp_path) not in response.text and str(secret) not in response.text
