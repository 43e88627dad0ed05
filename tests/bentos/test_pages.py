"""The service's index page loads only local assets and renders the API docs offline.

The fast tests put bentos.pages.LocalIndexMiddleware in front of an app that answers like
BentoML's own (its `main-openapi.html` at `/`, Swagger UI under `/static_content`, a spec at
`/docs.json`), served by uvicorn on loopback; the slow one opens `/` of a real `bentoml serve`.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.testclient import TestClient

from bentos.pages import LocalIndexMiddleware
from tests.bentos.conftest import Server
from tests.browser import remote_resources, render_offline, requires_chromium
from tests.serving import free_port

SPEC = {
    "openapi": "3.0.2",
    "info": {"title": "textgate", "version": "test"},
    "paths": {"/classify": {"post": {"summary": "classify", "responses": {"200": {}}}}},
}


def bentoml_like_app() -> Starlette:
    """BentoML's default index, its Swagger UI files and a small spec."""
    import _bentoml_impl.server as impl
    import bentoml._internal.server as internal

    async def index(_: object) -> FileResponse:
        return FileResponse(Path(impl.__file__).parent / "main-openapi.html")

    async def docs(_: object) -> JSONResponse:
        return JSONResponse(SPEC)

    assets = StaticFiles(directory=Path(internal.__file__).parent / "static_content")
    return Starlette(
        routes=[
            Route("/", index),
            Route("/docs.json", docs),
            Route("/classify", docs, methods=["POST"]),
            Mount("/static_content", app=assets),
        ]
    )


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    import uvicorn

    port = free_port()
    app = LocalIndexMiddleware(bentoml_like_app())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


def test_bentomls_own_index_page_loads_a_tag_manager():
    """The page the middleware replaces: the reason for bentos/pages.py."""
    page = TestClient(bentoml_like_app()).get("/").text
    assert any("googletagmanager.com" in url for url in remote_resources(page))


def test_the_index_page_loads_nothing_remote_and_other_routes_pass_through():
    client = TestClient(LocalIndexMiddleware(bentoml_like_app()))
    index = client.get("/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    assert remote_resources(index.text) == []
    assert "./static_content/swagger-ui-bundle.js" in index.text
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert client.get("/docs.json").json() == SPEC
    assert client.post("/classify").json() == SPEC


@requires_chromium
def test_the_index_page_renders_the_api_docs_offline(page_url: str):
    dom = render_offline(page_url)
    assert remote_resources(dom) == []
    assert 'data-path="/classify"' in dom  # Swagger UI rendered the spec it fetched


@pytest.mark.slow
@requires_chromium
def test_the_served_index_page_renders_offline_with_no_third_party_script(server: Server):
    with urllib.request.urlopen(f"{server.url}/", timeout=10) as response:
        page = response.read().decode("utf-8")
    assert remote_resources(page) == []
    dom = render_offline(f"{server.url}/")
    assert remote_resources(dom) == []
    assert 'data-path="/classify"' in dom and 'data-path="/explain"' in dom
