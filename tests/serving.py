"""A real `bentoml serve` on a free loopback port for tests, on top of `tasks.served`.

A server that does not start fails the test with the end of its log (`pytest.fail`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks.served import ServedCheckError, serve_bento
from textgate.process import free_port

__all__ = ["READY_TIMEOUT_S", "bentoml_serve", "free_port"]

READY_TIMEOUT_S = 120.0


@contextmanager
def bentoml_serve(
    bento_tag: str, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run `bentoml serve <bento_tag>` from `workdir`; yield its base URL once it is ready."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(
                serve_bento(bento_tag, workdir=workdir, env=env, ready_timeout_s=READY_TIMEOUT_S)
            )
        except ServedCheckError as error:
            # Only a failed start becomes a test failure; errors from the test body propagate.
            pytest.fail(str(error), pytrace=False)
        yield url


@contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A stdlib HTTP server with `handler` on a free loopback port, in a thread; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
