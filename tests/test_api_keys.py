"""Keys on every route of the app: with DYNAMERGE_API_KEY and DYNAMERGE_ADMIN_KEY set, only
/health, /ready and /metrics answer without a key; the user key cannot reach the admin
routes; the admin key opens them (and only them)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from pydantic import SecretStr
from server import LiveServer

from app.engine.engine import Engine
from app.main import create_app

USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
PUBLIC = {"/health", "/ready", "/metrics"}


@pytest.fixture(scope="module")
def server(micro_engine: Engine) -> Iterator[LiveServer]:
    settings = micro_engine.settings.model_copy(update={
        "api_key": SecretStr("user-key"), "admin_key": SecretStr("admin-key")})
    with LiveServer(create_app(settings, micro_engine)) as live:
        yield live


def _routes(server: LiveServer) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in."""
    out = []
    for route in iter_route_contexts(server.app.routes):
        for method in sorted(route.methods or ()):
            # A parameter names an adapter that does not exist: nothing is changed.
            out.append((method, re.sub(r"\{[^}]+\}", "no-such-adapter", route.path)))
    return out


def _call(http: httpx.Client, method: str, path: str, **kwargs: object) -> httpx.Response:
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return http.request(method, path, **body, **kwargs)


def test_the_route_list_is_the_whole_app(server: LiveServer) -> None:
    paths = {path for _, path in _routes(server)}
    assert PUBLIC | {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/route",
                     "/v1/generate", "/v1/embeddings", "/v1/merge/preview", "/v1/adapters",
                     "/v1/adapters/no-such-adapter", "/v1/models/no-such-adapter", "/openapi.json",
                     "/docs"} == paths


def test_no_route_but_the_probes_answers_without_the_right_key(server: LiveServer) -> None:
    with server.client() as http:
        for method, path in _routes(server):
            anonymous = _call(http, method, path)
            if path in PUBLIC:
                assert anonymous.status_code == 200, (method, path, anonymous.text)
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                response = _call(http, method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"]["type"] == "authentication_error"
            admin_only = path.startswith("/v1/adapters")
            # The other key is the wrong key: user on admin routes, admin on user routes.
            other = _call(http, method, path, headers=USER if admin_only else ADMIN)
            assert other.status_code == 401, (method, path, other.text)


def test_each_key_opens_its_own_routes(server: LiveServer) -> None:
    with server.client() as http:
        for method, path in _routes(server):
            if path in PUBLIC:
                continue
            headers = ADMIN if path.startswith("/v1/adapters") else USER
            response = _call(http, method, path, headers=headers)
            # Past the key: the request itself is judged (an empty body is 400, an unknown
            # adapter 404), never refused for its key.
            assert response.status_code not in (401, 403), (method, path, response.text)
            assert response.status_code < 500, (method, path, response.text)
        assert http.get("/v1/adapters", headers=ADMIN).status_code == 200
        assert http.get("/v1/models", headers=USER).status_code == 200
        assert http.delete("/v1/adapters/no-such-adapter", headers=ADMIN).status_code == 404
