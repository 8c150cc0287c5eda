"""`/admin/*` needs `Authorization: Bearer $RANKSERVE_ADMIN_TOKEN` (serve/security.py), and is off without a token.

The app is serve/http_app.py's, the one every server serves, over a stub service that records the
swaps it is asked for (no model, no Redis): what is tested is who gets through, not the swap itself
(tests/test_uvicorn_server.py and tests/test_serve_ray.py swap real models with the token).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve.config import ServiceConfig
from serve.http_app import HttpService, build_http_app
from serve.metrics import ServiceMetrics
from serve.schemas import ModelSwap
from serve.security import ADMIN_TOKEN_ENV

TOKEN = "s3cret-admin-token"
SWAP = {"variant": "onnx-fp32-opt"}


class StubBackend:
    async def model_info(self) -> dict[str, Any]:
        return {"name": "m", "variant": "v", "version": "1", "n_features": 3}

    async def probe(self) -> dict[str, Any]:
        return await self.model_info()

    async def score(self, features: Any) -> Any:
        raise AssertionError("not scored in these tests")


class SwapRecorder(HttpService):
    """Records each swap that got past the token check, and answers it as a successful one."""

    def __init__(self) -> None:
        super().__init__(ServiceConfig(cache=False), StubBackend(), metrics=ServiceMetrics(use_ray=False))
        self.swaps: list[str] = []

    async def swap_model(self, swap: ModelSwap) -> tuple[int, dict[str, Any]]:
        self.swaps.append(swap.variant)
        return 200, {"model": {"name": "m", "variant": swap.variant, "version": "2"}}


def app_with_token(monkeypatch: pytest.MonkeyPatch, token: str | None) -> tuple[FastAPI, SwapRecorder]:
    if token is None:
        monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(ADMIN_TOKEN_ENV, token)
    service = SwapRecorder()
    return build_http_app(service), service


def assert_names_the_field(resp: Any, status: int, rule_has: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["field"] == "authorization" and rule_has in body["rule"], body
    assert body["detail"] == f"authorization: {body['rule']}"


def test_without_a_bearer_token_401_asks_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    app, service = app_with_token(monkeypatch, TOKEN)
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}):
            resp = client.post("/admin/model", json=SWAP, headers=headers)
            assert_names_the_field(resp, 401, "Bearer")
            assert resp.headers["www-authenticate"] == "Bearer"
            assert ADMIN_TOKEN_ENV in resp.json()["rule"]
    assert service.swaps == []


def test_a_wrong_token_is_403(monkeypatch: pytest.MonkeyPatch) -> None:
    app, service = app_with_token(monkeypatch, TOKEN)
    with TestClient(app) as client:
        # A non-ASCII guess (latin-1 bytes on the wire) is a 403 too, not a 500 from compare_digest.
        for wrong in ("nope", TOKEN[:-1], TOKEN + "x", "é" + TOKEN):
            header = f"Bearer {wrong}".encode("latin-1")
            resp = client.post("/admin/model", json=SWAP, headers={"Authorization": header})
            assert_names_the_field(resp, 403, "not the server's")
            assert TOKEN not in resp.text  # the answer never echoes the token
    assert service.swaps == []


def test_the_right_token_swaps(monkeypatch: pytest.MonkeyPatch) -> None:
    app, service = app_with_token(monkeypatch, TOKEN)
    with TestClient(app) as client:
        for scheme in ("Bearer", "bearer"):
            resp = client.post("/admin/model", json=SWAP, headers={"Authorization": f"{scheme} {TOKEN}"})
            assert resp.status_code == 200, resp.text
            assert resp.json()["model"]["variant"] == "onnx-fp32-opt"
        assert client.get("/healthz").status_code == 200  # the other routes need no token
    assert service.swaps == ["onnx-fp32-opt", "onnx-fp32-opt"]


@pytest.mark.parametrize("token", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_no_token_configured_means_the_admin_api_is_off(monkeypatch: pytest.MonkeyPatch, token: str | None) -> None:
    app, service = app_with_token(monkeypatch, token)
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer  "}):
            resp = client.post("/admin/model", json=SWAP, headers=headers)
            assert_names_the_field(resp, 403, "disabled")
            assert ADMIN_TOKEN_ENV in resp.json()["rule"]
    assert service.swaps == []


def test_the_token_is_read_when_the_app_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    app, service = app_with_token(monkeypatch, TOKEN)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "changed-later")
    with TestClient(app) as client:
        assert client.post("/admin/model", json=SWAP, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        late = client.post("/admin/model", json=SWAP, headers={"Authorization": "Bearer changed-later"})
        assert late.status_code == 403
    assert service.swaps == ["onnx-fp32-opt"]


def test_the_openapi_shows_the_bearer_scheme_on_the_admin_route_only(monkeypatch: pytest.MonkeyPatch) -> None:
    app, _ = app_with_token(monkeypatch, TOKEN)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["adminToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    admin = schema["paths"]["/admin/model"]["post"]
    assert admin["security"] == [{"adminToken": []}]
    assert {"401", "403", "409", "422"} <= set(admin["responses"])
    assert "security" not in schema["paths"]["/rank"]["post"]
    assert "RankRequest" in schema["components"]["schemas"]  # install_openapi's models are still there


@pytest.mark.parametrize(("body", "status", "field"), [
    (b'{"variant": "../.."}', 422, "variant"),
    (b'{"variant": "onnx-fp32", "model": "a/../b"}', 422, "model"),
    (b'{"variant": "onnx-fp32", "model": "' + b"x" * 5000 + b'"}', 422, "model"),
    (b'{"variant": "onnx-fp32", "\\ud800": 1}', 422, "body"),
    (b'{"variant": ', 400, "body"),
])
def test_hostile_admin_bodies_get_a_4xx_naming_the_field(monkeypatch: pytest.MonkeyPatch, body: bytes, status: int,
                                                         field: str) -> None:
    """A model name is a folder name, never a path; FastAPI's own validation answers in the project's
    error shape, without echoing the input (a lone surrogate in it was a 500)."""
    app, service = app_with_token(monkeypatch, TOKEN)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/admin/model", content=body,
                           headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field and service.swaps == []
