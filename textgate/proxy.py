"""The switch in front of the served bentos: an HTTP reverse proxy with one live backend.

`textgate serve` listens with this aiohttp server and forwards every request to the current
backend, a `bentoml serve` of the production bento on a private loopback port. `switch`
points new requests at another backend at once (choosing a backend and counting the request
happen in the event loop with no await between them, as does the switch, so none slips
through); `drain` then waits until the requests already sent to the old backend have been
answered, so the old server can be stopped without failing any.

aiohttp on both sides (its C HTTP parser, and a pool of keep-alive connections to the
backend) keeps the hop cheap: httpx's client alone spent about 3 ms of CPU per request where
aiohttp's spends 0.15 ms (bench/serve.py's measurement), more than the model on a small input.

A request whose connection to the backend is refused (the backend is gone) is sent again to
the current backend, once it differs or after a short wait: the request never reached a
server, so repeating it is safe. Any other failure answers 502 (or 503 with Retry-After
when there is no backend) with `{"error": ...}`, as the service's own errors are shaped.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

MODEL_HEADER = "x-textgate-model"
# Hop-by-hop headers (RFC 9110, 7.6.1) are the proxy's own on each side, never forwarded;
# the length is recomputed.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Above the service's own limit (1 MiB), so the service answers an oversized body with its 413.
MAX_BODY_BYTES = 2 << 20
# A backend's connection pool: more than the clients one server is expected to carry.
MAX_CONNECTIONS = 256
# Under the backend's keep-alive timeout (uvicorn's 5 s), so the proxy closes an idle
# connection before the backend does and never sends on one being closed.
KEEPALIVE_S = 2.0
REQUEST_TIMEOUT_S = 60.0
RETRY_WAIT_S = 0.2
RETRIES = 10  # about 2 s of waiting for a backend after a refused connection
SHADOWED_ROUTE = "/classify"


@dataclass(eq=False)
class Backend:
    """One served bento: its tag, base URL and the requests it is answering now."""

    tag: str
    url: str
    in_flight: int = 0
    # The loopback address to connect from: a bento on a slot of the public port is reached
    # through its slot's source address (textgate.reuseport); None: any.
    local_addr: str | None = None
    session: aiohttp.ClientSession | None = field(default=None, repr=False)

    def open(self) -> aiohttp.ClientSession:
        """The connection pool to this backend (created in the event loop that uses it)."""
        if self.session is None:
            connector = aiohttp.TCPConnector(
                limit=MAX_CONNECTIONS,
                keepalive_timeout=KEEPALIVE_S,
                force_close=False,
                local_addr=None if self.local_addr is None else (self.local_addr, 0),
            )
            self.session = aiohttp.ClientSession(
                base_url=self.url,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                # A proxy keeps no cookies (nor spends the jar's work on each request).
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self.session


class Proxy:
    """Forwards each request to `current` (see the module docstring); `app` serves it."""

    def __init__(self, api_routes: Sequence[str] = ("/classify", "/explain")) -> None:
        self.current: Backend | None = None
        self.api_routes = frozenset(api_routes)
        self.requests = 0
        self.shadow: Shadow | None = None
        # True while new connections go straight to the serving bento (textgate.reuseport):
        # each answer here then closes its connection, so the client reconnects to the bento.
        self.release = False

    def server(self) -> web.Server:
        """aiohttp's low-level server: every method and path goes to `forward` (no router or
        middleware to pass through; run it with `web.ServerRunner`)."""

        def request(*args: Any) -> web.BaseRequest:  # message, payload, protocol, writer, task
            loop = asyncio.get_running_loop()
            return web.BaseRequest(*args, loop, client_max_size=MAX_BODY_BYTES)

        return web.Server(self.forward, request_factory=request, access_log=None)

    async def switch(self, backend: Backend | None) -> Backend | None:
        """Send new requests to `backend` (None: answer 503 until there is one); return the
        previous one (still to be drained)."""
        if backend is not None:
            backend.open()
        previous, self.current = self.current, backend
        return previous

    async def drain(self, backend: Backend, timeout_s: float) -> bool:
        """Wait until `backend` answers nothing, then close its pool; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while backend.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        drained = backend.in_flight == 0
        if backend.session is not None:
            await backend.session.close()
            backend.session = None
        return drained

    async def close(self) -> None:
        """Close the current backend's pool (when the proxy stops)."""
        if self.current is not None and self.current.session is not None:
            await self.current.session.close()
            self.current.session = None

    async def forward(self, request: web.BaseRequest) -> web.Response:
        """Send the request to the current backend (again after a refused connection)."""
        body = await request.read()
        self.requests += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in range(RETRIES + 1):
            backend = self.current
            if backend is None:
                return _error(503, "no model is served yet: retry", retry_after=True)
            backend.in_flight += 1
            started = time.perf_counter()
            try:
                async with backend.open().request(
                    request.method, request.rel_url, headers=headers, data=body
                ) as response:
                    content = await response.read()
                    if self.shadow is not None and request.path == SHADOWED_ROUTE:
                        elapsed_ms = (time.perf_counter() - started) * 1000
                        self.shadow.mirror(backend.tag, body, headers, content, elapsed_ms)
                    answer = self._answer(request, response, content, backend)
                    if self.release:
                        answer.force_close()
                    return answer
            except aiohttp.ClientConnectorError as error:
                if attempt == RETRIES:
                    return _error(503, f"{backend.tag} is not answering: {error}", True)
            except (aiohttp.ClientError, TimeoutError) as error:
                return _error(502, f"{backend.tag} failed: {type(error).__name__}")
            finally:
                backend.in_flight -= 1
            if self.current is backend:
                await asyncio.sleep(RETRY_WAIT_S)
        raise AssertionError("not reached")

    def _answer(
        self,
        request: web.BaseRequest,
        response: aiohttp.ClientResponse,
        content: bytes,
        backend: Backend,
    ) -> web.Response:
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]
        # A bento built before the service set the header still says which model answered.
        if request.path in self.api_routes and MODEL_HEADER not in response.headers:
            headers.append((MODEL_HEADER, backend.tag))
        return web.Response(status=response.status, body=content, headers=headers)


class Shadow:
    """A shadow candidate: gets a copy of sampled `/classify` requests once production has
    answered them; both answers go to `sink` as a textgate.shadow record, never to clients.

    At most `max_in_flight` copies are in flight: beyond, a request is not mirrored (the
    candidate must not slow production down by queueing work on the same CPUs).
    """

    def __init__(
        self,
        backend: Backend,
        sink: Callable[[dict[str, Any]], None],
        sample_rate: float,
        max_in_flight: int = 8,
        seed: int | None = None,
    ) -> None:
        self.backend = backend
        self.sink = sink
        self.sample_rate = sample_rate
        self.max_in_flight = max_in_flight
        self.random = random.Random(seed)
        self.tasks: set[asyncio.Task[None]] = set()

    def mirror(
        self, production: str, body: bytes, headers: dict[str, str], answer: bytes, ms: float
    ) -> None:
        """Send a copy of the request to the candidate, in the background (when sampled)."""
        ours = shadow_answers(answer)
        if ours is None or self.random.random() >= self.sample_rate:
            return
        if self.backend.in_flight >= self.max_in_flight:
            return
        task = asyncio.create_task(self._send(production, ours, body, headers, ms))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(
        self,
        production: str,
        ours: tuple[list[str], list[bool]],
        body: bytes,
        headers: dict[str, str],
        production_ms: float,
    ) -> None:
        record: dict[str, Any] = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "production": production,
            "candidate": self.backend.tag,
            "production_ms": round(production_ms, 3),
            "candidate_ms": None,
            "production_labels": ours[0],
            "production_abstained": ours[1],
        }
        self.backend.in_flight += 1
        started = time.perf_counter()
        try:
            async with self.backend.open().post(
                SHADOWED_ROUTE, headers=headers, data=body
            ) as response:
                content = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            record["candidate_error"] = type(error).__name__
        else:
            record["candidate_ms"] = round((time.perf_counter() - started) * 1000, 3)
            theirs = shadow_answers(content) if status == 200 else None
            if theirs is None:
                record["candidate_error"] = f"HTTP {status}"
            else:
                record["candidate_labels"], record["candidate_abstained"] = theirs
        finally:
            self.backend.in_flight -= 1
        self.sink(record)


def shadow_answers(content: bytes) -> tuple[list[str], list[bool]] | None:
    """The labels and abstentions of a `/classify` answer body, or None."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    if not isinstance(body, list) or not all(
        isinstance(item, dict)
        and isinstance(item.get("label"), str)
        and isinstance(item.get("abstained"), bool)
        for item in body
    ):
        return None
    return [item["label"] for item in body], [item["abstained"] for item in body]


def _error(status: int, message: str, retry_after: bool = False) -> web.Response:
    headers = {"Retry-After": "1"} if retry_after else {}
    return web.Response(
        status=status,
        text=json.dumps({"error": message}),
        content_type="application/json",
        headers=headers,
    )
