"""bench/overload.py's summary of a burst (the burst itself needs a running server)."""

from __future__ import annotations

import httpx

from bench.overload import describe


def test_a_burst_is_summarised_by_status_retry_after_and_unexpected_errors():
    ok = httpx.Response(200, json=[{"label": "a"}])
    refused = httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "overloaded: x"})
    generic = httpx.Response(503, json={"error": "An unexpected error has occurred"})
    line = describe(4, [ok, refused, refused, generic])
    assert line.startswith("4 clients: {200: 1, 503: 3}; Retry-After ['1', 'none']")
    assert "'unexpected error' 1" in line
