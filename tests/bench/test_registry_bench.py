"""bench/registry.py on real servers, a few promotions each: every backend keeps every
promotion, sequential and concurrent, and the S3 design's conditional put refuses a taken
number."""

from __future__ import annotations

import pytest

from bench import registry as bench

pytestmark = pytest.mark.slow


def test_a_small_run_measures_every_backend_and_loses_nothing(postgres_server, capsys) -> None:
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra)")

    assert bench.main(["--promotions", "4", "--writers", "2", "--per-writer", "3"]) == 0

    out = capsys.readouterr().out
    for name in ("file", "postgresql", "s3-conditional"):
        assert f"{name}: p50" in out
    assert out.count("none lost") == 3
    assert "ratio to the file backend" in out


def test_the_s3_design_never_overwrites_a_taken_release_number(s3_env) -> None:
    from botocore.exceptions import ClientError

    server, bucket = s3_env
    s3 = bench.S3Registry(server.endpoint, bucket)
    s3.promote(bench.release(1))
    with pytest.raises(ClientError) as caught:
        s3.client.put_object(
            Bucket=bucket, Key="releases/000000000000.json", Body=b"{}", IfNoneMatch="*"
        )
    assert caught.value.response["Error"]["Code"] in ("PreconditionFailed", "412")
    assert [item["bento_tag"] for item in s3.history()] == ["textgate:b1"]
