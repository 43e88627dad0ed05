"""The switch in front of the served bentos: an HTTP reverse proxy with one live backend.

`textgate serve` listens with this ASGI app (run by uvicorn) and forwards every request to
the current backend, a `bentoml serve` of the production bento on a private loopback port.
`switch` points new requests at another backend at once (nothing is in flight between
choosing a backend and counting the request: both happen in the event loop, as does the
switch); `drain` then waits until the requests already sent to the old backend have been
answered, so the old server can be stopped without failing any.

A request whose connection to the backend is refused (the backend is gone) is sent again to
the current backend, once it differs or after a short wait: the request never reached a
server, so repeating it is safe. Any other failure answers 502 (or 503 with Retry-After
when there is no backend) with `{"error": ...}`, as the service's own errors are shaped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

MODEL_HEADER = "x-textgate-model"
# Hop-by-hop headers (RFC 9110, 7.6.1) are the proxy's own on each side, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
# Above the service's own limit (1 MiB), so the service answers an oversized body with its 413.
MAX_BODY_BYTES = 2 << 20
# A backend's connection pool: more than the clients one server is expected to carry.
MAX_CONNECTIONS = 256
REQUEST_TIMEOUT_S = 60.0
RETRY_WAIT_S = 0.2
RETRIES = 10  # about 2 s of waiting for a backend after a refused connection

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(eq=False)
class Backend:
    """One served bento: its tag, base URL and the requests it is answering now."""

    tag: str
    url: str
    in_flight: int = 0
    client: httpx.AsyncClient | None = field(default=None, repr=False)

    def open(self) -> httpx.AsyncClient:
        """The connection pool to this backend (created in the event loop that uses it)."""
        if self.client is None:
            limits = httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
            )
            self.client = httpx.AsyncClient(
                base_url=self.url, trust_env=False, timeout=REQUEST_TIMEOUT_S, limits=limits
            )
        return self.client


class Proxy:
    """The ASGI app: forwards each request to `current` (see the module docstring)."""

    def __init__(self, api_routes: Sequence[str] = ("/classify", "/explain")) -> None:
        self.current: Backend | None = None
        self.api_routes = frozenset(api_routes)
        self.requests = 0

    async def switch(self, backend: Backend) -> Backend | None:
        """Send new requests to `backend`; return the previous one (still to be drained)."""
        backend.open()
        previous, self.current = self.current, backend
        return previous

    async def drain(self, backend: Backend, timeout_s: float) -> bool:
        """Wait until `backend` answers nothing, then close its pool; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while backend.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        drained = backend.in_flight == 0
        if backend.client is not None:
            await backend.client.aclose()
            backend.client = None
        return drained

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:
            await _send_error(send, 413, f"the request body must be at most {MAX_BODY_BYTES} bytes")
            return
        self.requests += 1
        await self._forward(scope, body, send)

    async def _forward(self, scope: Scope, body: bytes, send: Send) -> None:
        """Send the request to the current backend (again after a refused connection)."""
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        target = scope["raw_path"] or scope["path"].encode("latin-1")
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        for attempt in range(RETRIES + 1):
            backend = self.current
            if backend is None:
                await _send_error(send, 503, "no model is served yet: retry", retry_after=True)
                return
            backend.in_flight += 1
            try:
                response = await backend.open().request(
                    scope["method"], target.decode("latin-1"), headers=headers, content=body
                )
            except httpx.ConnectError as error:
                if attempt == RETRIES:
                    await _send_error(send, 503, f"{backend.tag} is not answering: {error}", True)
                    return
            except httpx.HTTPError as error:
                await _send_error(send, 502, f"{backend.tag} failed: {type(error).__name__}")
                return
            else:
                await self._answer(scope, response, backend, send)
                return
            finally:
                backend.in_flight -= 1
            if self.current is backend:
                await asyncio.sleep(RETRY_WAIT_S)

    async def _answer(
        self, scope: Scope, response: httpx.Response, backend: Backend, send: Send
    ) -> None:
        content = response.content
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
        # A bento built before the service set the header still says which model answered.
        if scope["path"] in self.api_routes and MODEL_HEADER not in response.headers:
            headers.append((MODEL_HEADER.encode(), backend.tag.encode("latin-1")))
        headers.append((b"content-length", str(len(content)).encode("ascii")))
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": content})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it exceeds MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_error(send: Send, status: int, message: str, retry_after: bool = False) -> None:
    body = json.dumps({"error": message}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
