"""Shadow evaluation: a candidate answers a sample of live requests beside production.

`textgate serve` (textgate.proxy) sends a copy of sampled `/classify` requests to the shadow
candidate once production has answered, and appends one `ShadowRecord` per request to the
shadow log: both answers' labels and abstentions and both latencies, never the texts. The
candidate's answers are never returned to the client.

`shadow_checks` compares the two on the same requests: label agreement, abstention rate,
p95 latency and the candidate's errors, against the `shadow` section of params.yaml, after
`shadow.min_requests` mirrored requests (or `shadow.max_hours` of waiting).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from textgate.config import ShadowConfig
from textgate.gate import Check, _bound_check


class ShadowRecord(BaseModel):
    """One mirrored request: production's answer and the candidate's (or its error)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    ts: str
    production: str  # bento tags
    candidate: str
    production_ms: float
    candidate_ms: float | None
    production_labels: list[str]
    production_abstained: list[bool]
    candidate_labels: list[str] | None = None
    candidate_abstained: list[bool] | None = None
    candidate_error: str | None = None


@dataclass(frozen=True)
class ShadowSummary:
    """The comparison over a shadow log's records for one candidate."""

    requests: int
    texts: int
    errors: int
    agreement: float
    production_abstention: float
    candidate_abstention: float
    production_p95_ms: float
    candidate_p95_ms: float


def read_shadow_log(path: Path, candidate: str) -> list[ShadowRecord]:
    """The records of `candidate` in the shadow log at `path` (none if it does not exist);
    lines that are not records (a torn last line) are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = ShadowRecord.model_validate(json.loads(line))
        except (ValueError, ValidationError):
            continue
        if record.candidate == candidate:
            records.append(record)
    return records


def summarise(records: Iterable[ShadowRecord]) -> ShadowSummary:
    """Agreement and abstention over texts both answered; latencies and errors per request."""
    records = list(records)
    answered = [r for r in records if r.candidate_error is None and r.candidate_labels]
    pairs = [
        (p, c, pa, ca)
        for r in answered
        for p, c, pa, ca in zip(
            r.production_labels,
            r.candidate_labels or [],
            r.production_abstained,
            r.candidate_abstained or [],
            strict=False,
        )
    ]
    texts = len(pairs)

    def share(values: Iterable[bool]) -> float:
        return sum(values) / texts if texts else math.nan

    def p95(values: list[float]) -> float:
        return float(np.percentile(values, 95)) if values else math.nan

    return ShadowSummary(
        requests=len(records),
        texts=texts,
        errors=len(records) - len(answered),
        agreement=share(p == c for p, c, _, _ in pairs),
        production_abstention=share(pa for _, _, pa, _ in pairs),
        candidate_abstention=share(ca for _, _, _, ca in pairs),
        production_p95_ms=p95([r.production_ms for r in answered]),
        candidate_p95_ms=p95([r.candidate_ms for r in answered if r.candidate_ms is not None]),
    )


def shadow_checks(summary: ShadowSummary, config: ShadowConfig, waited_hours: float) -> list[Check]:
    """The `shadow` checks: enough evidence, then agreement, abstention, latency and errors."""
    enough = summary.requests >= config.min_requests or (
        waited_hours >= config.max_hours and summary.requests > 0
    )
    evidence = Check(
        name="shadow",
        kind="shadow",
        metric="shadow_requests",
        value=float(summary.requests),
        threshold=float(config.min_requests),
        passed=enough,
        reason=(
            f"{summary.requests} mirrored requests (shadow.min_requests={config.min_requests}) "
            f"after {waited_hours:.2f} h (shadow.max_hours={config.max_hours})"
            + ("" if enough else ": not enough evidence yet")
        ),
    )
    latency_ratio = (
        summary.candidate_p95_ms / summary.production_p95_ms
        if summary.production_p95_ms > 0
        else math.nan
    )
    error_rate = summary.errors / summary.requests if summary.requests else math.nan
    return [
        evidence,
        _bound_check(
            "shadow_agreement", "shadow", "agreement", summary.agreement, config.min_agreement
        ),
        _bound_check(
            "shadow_abstention",
            "shadow",
            "abstention_increase",
            summary.candidate_abstention - summary.production_abstention,
            config.max_abstention_increase,
            "<=",
        ),
        _bound_check(
            "shadow_p95_latency",
            "shadow",
            "p95_latency_ratio",
            latency_ratio,
            config.max_p95_latency_ratio,
            "<=",
        ),
        _bound_check(
            "shadow_errors", "shadow", "error_rate", error_rate, config.max_error_rate, "<="
        ),
    ]
