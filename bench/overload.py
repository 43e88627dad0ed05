"""Where overload starts: bursts of concurrent clients against a running textgate server.

Half the clients send /classify with 64 texts of about 2,000 characters, half /explain; each
burst prints the answers by status, the Retry-After and error bodies of the refused ones, and
how many said "unexpected error" (none should). Start the server first (`make serve`), then:

    .venv/bin/python -m bench.overload [--url http://127.0.0.1:3000] [--clients 8 16 32 64]

Not a speed benchmark (nothing to compare with): it shows the overload answer and where
it starts for the served bento's serve.max_concurrency.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
from collections.abc import Sequence

import httpx

LONG_TEXTS = ["my card was lost and I need a new one " + "x" * 1950] * 64
EXPLAIN_TEXT = "I lost my card yesterday and need a new one please " * 9


def burst(url: str, clients: int) -> list[httpx.Response]:
    """`clients` requests at once, alternately /classify (64 long texts) and /explain."""

    def call(i: int) -> httpx.Response:
        if i % 2 == 0:
            return httpx.post(f"{url}/classify", json={"texts": LONG_TEXTS}, timeout=120)
        return httpx.post(f"{url}/explain", json={"text": EXPLAIN_TEXT}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(call, range(clients)))


def describe(clients: int, responses: Sequence[httpx.Response]) -> str:
    statuses = collections.Counter(r.status_code for r in responses)
    refused = [r for r in responses if r.status_code != 200]
    retry_after = sorted({r.headers.get("retry-after", "none") for r in refused})
    bodies = sorted({r.text[:80] for r in refused})
    unexpected = sum("unexpected error" in r.text for r in responses)
    return (
        f"{clients} clients: {dict(sorted(statuses.items()))}; Retry-After {retry_after}; "
        f"bodies {bodies}; 'unexpected error' {unexpected}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args(argv)
    for clients in args.clients:
        print(describe(clients, burst(args.url.rstrip("/"), clients)), flush=True)


if __name__ == "__main__":
    main()
