"""Fuzzing the served API: no input, however malformed, gets a 5xx.

The requests come from the service's own OpenAPI schema (`GET /docs.json`) through
schemathesis: bodies that fit it (positive) and bodies that break it in every way the schema
allows (negative: wrong types, missing and extra fields, out-of-range lengths). Raw junk
bodies with assorted content types cover what no schema describes. Runs are bounded and
derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.bentos.conftest import Server

pytestmark = pytest.mark.slow

OPERATIONS = ["/classify", "/explain"]
MAX_EXAMPLES = 150
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written to .hypothesis/
    suppress_health_check=list(HealthCheck),
)
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/vnd.bentoml+pickle",
    "application/octet-stream",
    "",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(["texts", "text", "x"]) | st.text(max_size=5), children)
    ),
    max_leaves=20,
)


def assert_not_a_server_error(response: httpx.Response | schemathesis.Response, what: str):
    assert response.status_code < 500, f"{what} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        assert response.text.strip(), f"{what} -> {response.status_code} with an empty body"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", OPERATIONS)
def test_requests_from_the_openapi_schema_never_get_a_5xx(
    server: Server, path: str, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    operation = schema[path]["POST"]

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.url, timeout=30)
        assert_not_a_server_error(response, case.as_curl_command())

    check()


@pytest.mark.parametrize("path", OPERATIONS)
def test_junk_bodies_never_get_a_5xx(server: Server, path: str) -> None:
    bodies = (
        st.binary(max_size=300)
        | JSON_VALUES.map(lambda value: json.dumps(value).encode("utf-8"))
        | st.text(max_size=300).map(lambda text: text.encode("utf-8"))
    )

    with httpx.Client(base_url=server.url, timeout=30) as client:

        @FUZZ_SETTINGS
        @given(body=bodies, content_type=st.sampled_from(CONTENT_TYPES))
        def check(body: bytes, content_type: str) -> None:
            headers = {"content-type": content_type} if content_type else {}
            response = client.post(path, content=body, headers=headers)
            assert_not_a_server_error(response, f"POST {path} {content_type!r} {body[:200]!r}")

        check()
