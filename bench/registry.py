"""Promotion latency and throughput: the registry file (the baseline), the PostgreSQL
registry, and an S3 conditional-write design, measured in the same run.

    python -m bench.registry                       # 200 promotions each, then 4 writers x 50
    python -m bench.registry --promotions 500 --writers 8

Each backend starts empty. *Sequential*: one process promotes `--promotions` times; the
latency of each promotion (its read of the history included) is recorded. *Concurrent*:
`--writers` processes each promote `--per-writer` times at once; the wall time gives the
throughput, and the history is checked for lost promotions.

The S3 design is the alternative the issue names, measured without being built into
textgate: one object per release, `releases/<seq>.json`, written with `If-None-Match: *` so
two writers cannot both take the same number; the loser re-lists and retries. A reader lists
and fetches every object. It runs against a moto server on loopback (no network latency: a
real S3 adds tens of ms to each request, so its figures are a lower bound).

PostgreSQL and moto run on this machine (textgate/pglocal.py, `python -m moto.server`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textgate import pglocal
from textgate.process import free_port, start_process, wait_ready
from textgate.registry import Registry, Release

S3_KEYS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
S3_RETRIES = 1000


def release(n: int) -> Release:
    return Release.create(
        bento_tag=f"textgate:b{n}",
        model_tag=f"textgate-classifier:m{n}",
        reason="bench",
        metrics={"accuracy": 0.97, "macro_f1": 0.96, "per_class": {"a": 0.9, "b": 0.95}},
        lineage={"git_commit": "0" * 40, "data_md5": "d" * 32, "model_md5": "m" * 32},
    )


class S3Registry:
    """One object per release, claimed with a conditional put (If-None-Match: *)."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **S3_KEYS)
        self.bucket = bucket
        self.conflicts = 0

    def _keys(self) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix="releases/"
        ):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)

    def history(self) -> list[dict[str, Any]]:
        return [
            json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            for key in self._keys()
        ]

    def promote(self, item: Release) -> None:
        from botocore.exceptions import ClientError

        body = item.model_dump_json().encode()
        for _ in range(S3_RETRIES):
            self.history()  # a promotion reads the history first, as textgate's do
            key = f"releases/{len(self._keys()):012d}.json"
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
                return
            except ClientError as error:
                if error.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
                    raise
                self.conflicts += 1
        raise RuntimeError(f"no free release number after {S3_RETRIES} tries")


def make_promoter(spec: dict[str, str]) -> tuple[Callable[[Release], None], Callable[[], int]]:
    """(promote, count) for the backend `spec` describes (picklable, for the writers)."""
    if spec["kind"] == "s3":
        s3 = S3Registry(spec["endpoint"], spec["bucket"])
        return s3.promote, lambda: len(s3.history())
    registry = Registry(spec["path"], url=spec.get("url") or "")
    return registry.promote, lambda: len(registry.history())


def sequential(spec: dict[str, str], promotions: int) -> list[float]:
    promote, count = make_promoter(spec)
    latencies = []
    for n in range(promotions):
        started = time.perf_counter()
        promote(release(n))
        latencies.append(time.perf_counter() - started)
    assert count() == promotions, f"{spec['kind']}: lost promotions"
    return latencies


def _writer(spec: dict[str, str], first: int, count: int, barrier: Any) -> None:
    promote, _ = make_promoter(spec)
    barrier.wait()
    for n in range(first, first + count):
        promote(release(n))


def concurrent(spec: dict[str, str], writers: int, per_writer: int) -> float:
    """Seconds for `writers` processes to promote `per_writer` times each, at once."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(writers + 1)
    processes = [
        context.Process(target=_writer, args=(spec, 10_000 * (i + 1), per_writer, barrier))
        for i in range(writers)
    ]
    for process in processes:
        process.start()
    barrier.wait()
    started = time.perf_counter()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{spec['kind']}: a writer failed ({process.exitcode})")
    return time.perf_counter() - started


def summary(name: str, latencies: list[float], wall: float, promoted: int) -> dict[str, Any]:
    ms = sorted(1000 * value for value in latencies)
    return {
        "backend": name,
        "p50_ms": statistics.median(ms),
        "p95_ms": ms[int(0.95 * (len(ms) - 1))],
        "last_ms": ms and 1000 * latencies[-1],
        "concurrent_per_s": promoted / wall,
    }


def _database(server: pglocal.LocalPostgres, name: str) -> str:
    import psycopg

    base = server.url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


def _bucket(endpoint: str, name: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **S3_KEYS).create_bucket(
        Bucket=name
    )
    return name


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    pg_root = Path(tempfile.mkdtemp(prefix="bench-registry-pg-", dir="/tmp"))
    port = free_port()
    moto = start_process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        log_path=work / "moto.log",
        name="moto S3 server",
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with moto:
            wait_ready(moto, f"{endpoint}/moto-api/", timeout_s=60)
            server = pglocal.start(pg_root)
            specs: dict[str, Callable[[str], dict[str, str]]] = {
                "file": lambda phase: {"kind": "file", "path": str(work / phase / "r.json")},
                "postgresql": lambda phase: {
                    "kind": "postgresql",
                    "path": "/nonexistent",
                    "url": _database(server, phase),
                },
                "s3-conditional": lambda phase: {
                    "kind": "s3",
                    "endpoint": endpoint,
                    "bucket": _bucket(endpoint, phase.replace("_", "-")),
                },
            }
            return [_measure(name, make, args) for name, make in specs.items()]
    finally:
        pglocal.stop(pg_root)
        shutil.rmtree(pg_root, ignore_errors=True)


def _measure(name: str, make: Callable[[str], dict[str, str]], args) -> dict[str, Any]:
    key = name.replace("-", "")
    latencies = sequential(make(f"seq_{key}"), args.promotions)
    spec = make(f"conc_{key}")
    wall = concurrent(spec, args.writers, args.per_writer)
    _, count = make_promoter(spec)
    promoted = args.writers * args.per_writer
    assert count() == promoted, f"{name}: {count()} of {promoted} concurrent promotions kept"
    result = summary(name, latencies, wall, promoted)
    print(
        f"{name:>15}: p50 {result['p50_ms']:7.2f} ms  p95 {result['p95_ms']:7.2f} ms  "
        f"promotion #{args.promotions} {result['last_ms']:7.2f} ms  "
        f"{args.writers} writers: {result['concurrent_per_s']:7.1f} promotions/s, none lost",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.registry", description=__doc__)
    parser.add_argument("--promotions", type=int, default=200, help="sequential (default 200)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers (default 4)")
    parser.add_argument("--per-writer", type=int, default=50, help="each writer (default 50)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as work:
        results = run(args, Path(work))
    baseline = results[0]
    print("\nratio to the file backend (the baseline):")
    for result in results[1:]:
        print(
            f"  {result['backend']:>15}: p50 latency x{result['p50_ms'] / baseline['p50_ms']:.2f}, "
            f"concurrent throughput x"
            f"{result['concurrent_per_s'] / baseline['concurrent_per_s']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
