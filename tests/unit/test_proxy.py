"""textgate.proxy: the switch between backends, on real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from textgate.process import free_port
from textgate.proxy import MODEL_HEADER, Backend, Proxy


@asynccontextmanager
async def backend_server(name: str, delay_s: float = 0.0) -> AsyncIterator[str]:
    """A backend answering every request with its name after `delay_s`; its URL."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay_s)
        headers = {} if name.startswith("old-") else {MODEL_HEADER: name}
        return web.json_response({"name": name, "path": request.path_qs}, headers=headers)

    app = web.Application(client_max_size=4 << 20)  # the proxy's limit is the one tested
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def proxy_server(proxy: Proxy) -> AsyncIterator[str]:
    runner = web.ServerRunner(proxy.server())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await proxy.close()


@asynccontextmanager
async def one_backend(name: str, tag: str) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """The proxy's URL, switched to one backend answering as `name` under `tag`, and a client."""
    proxy = Proxy()
    async with (
        backend_server(name) as backend_url,
        proxy_server(proxy) as url,
        aiohttp.ClientSession() as session,
    ):
        await proxy.switch(Backend(tag, backend_url))
        yield url, session


async def classify(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None, dict]:
    async with session.post(f"{url}/classify?x=1", json={"texts": ["hi"]}) as response:
        return response.status, response.headers.get(MODEL_HEADER), await response.json()


def test_without_a_backend_the_proxy_answers_503_with_retry_after() -> None:
    async def scenario() -> None:
        async with (
            proxy_server(Proxy()) as url,
            aiohttp.ClientSession() as session,
            session.post(f"{url}/classify", json={}) as response,
        ):
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert "no model is served" in (await response.json())["error"]

    asyncio.run(scenario())


def test_requests_in_flight_finish_on_the_old_backend_and_new_ones_go_to_the_new() -> None:
    async def scenario() -> None:
        proxy = Proxy()
        async with (
            backend_server("a", delay_s=0.5) as a_url,
            backend_server("b") as b_url,
            proxy_server(proxy) as url,
            aiohttp.ClientSession() as session,
        ):
            a = Backend("a", a_url)
            await proxy.switch(a)
            slow = asyncio.create_task(classify(session, url))
            await asyncio.sleep(0.2)
            assert a.in_flight == 1
            assert await proxy.switch(Backend("b", b_url)) is a
            status, tag, body = await classify(session, url)
            assert (status, tag, body["path"]) == (200, "b", "/classify?x=1")
            assert await proxy.drain(a, timeout_s=5)  # waits for the slow request
            assert (await slow)[:2] == (200, "a")
            assert a.session is None

    asyncio.run(scenario())


def test_a_drain_that_times_out_says_so() -> None:
    async def scenario() -> None:
        proxy = Proxy()
        async with (
            backend_server("a", delay_s=1.0) as a_url,
            proxy_server(proxy) as url,
            aiohttp.ClientSession() as session,
        ):
            a = Backend("a", a_url)
            await proxy.switch(a)
            slow = asyncio.create_task(classify(session, url))
            await asyncio.sleep(0.2)
            assert not await proxy.drain(a, timeout_s=0.1)
            assert (await slow)[0] == 502  # its pool was closed under it

    asyncio.run(scenario())


def test_a_refused_connection_is_retried_on_the_backend_switched_to() -> None:
    async def scenario() -> None:
        proxy = Proxy()
        async with (
            backend_server("b") as b_url,
            proxy_server(proxy) as url,
            aiohttp.ClientSession() as session,
        ):
            gone = Backend("gone", f"http://127.0.0.1:{free_port()}")
            await proxy.switch(gone)
            request = asyncio.create_task(classify(session, url))
            await asyncio.sleep(0.1)
            await proxy.drain(await proxy.switch(Backend("b", b_url)), timeout_s=5)
            assert (await request)[:2] == (200, "b")

    asyncio.run(scenario())


def test_the_proxy_names_the_backend_when_an_older_bento_does_not() -> None:
    async def scenario() -> None:
        async with one_backend("old-bento", "textgate:old") as (url, session):
            assert (await classify(session, url))[:2] == (200, "textgate:old")
            async with session.get(f"{url}/readyz") as response:  # not an API route
                assert MODEL_HEADER not in response.headers

    asyncio.run(scenario())


def test_a_body_over_the_proxys_limit_is_refused_with_413_and_one_under_it_is_forwarded() -> None:
    from textgate.proxy import MAX_BODY_BYTES

    async def scenario() -> None:
        async with one_backend("textgate:a", "textgate:a") as (url, session):
            async with session.post(f"{url}/classify", data=b"x" * (MAX_BODY_BYTES + 1)) as big:
                assert big.status == 413
            # Under the proxy's limit (over the service's own 1 MiB): the backend answers.
            async with session.post(f"{url}/classify", data=b"x" * (3 << 19)) as response:
                assert response.status == 200

    asyncio.run(scenario())


def test_while_released_each_answer_closes_its_connection() -> None:
    async def scenario() -> None:
        proxy = Proxy()
        async with (
            backend_server("a") as backend_url,
            proxy_server(proxy) as url,
            aiohttp.ClientSession() as session,
        ):
            await proxy.switch(Backend("textgate:a", backend_url))
            async with session.post(f"{url}/classify", json={}) as response:
                assert response.status == 200 and "Connection" not in response.headers
            proxy.release = True  # the clients' new connections now reach the bento directly
            async with session.post(f"{url}/classify", json={}) as response:
                assert response.status == 200 and response.headers["Connection"] == "close"
                assert response.headers[MODEL_HEADER] == "a"

    asyncio.run(scenario())
