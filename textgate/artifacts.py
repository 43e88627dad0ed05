"""Each stage's output files: where they are (from params) and what they hold.

The one place that spells a stage's file names; every reader and writer goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from textgate.config import RegistryConfig
from textgate.io import write_json

# --- verdicts (the pipeline's gate, kept next to the registry unless placed elsewhere) ----


@dataclass(frozen=True)
class VerdictOutputs:
    """The gate's verdict files: one per run, and the newest again as `latest.json`."""

    directory: Path

    @property
    def latest(self) -> Path:
        return self.directory / "latest.json"

    def of_run(self, created_at: datetime) -> Path:
        """The file of the verdict decided at `created_at` (UTC)."""
        return self.directory / f"{created_at.strftime('%Y%m%dT%H%M%S%fZ')}.json"


def verdict_outputs(registry: RegistryConfig) -> VerdictOutputs:
    """`registry.verdicts_dir`, or `verdicts/` next to the registry file when it is null."""
    return VerdictOutputs(registry.verdicts_dir or registry.path.parent / "verdicts")


def write_verdict(outputs: VerdictOutputs, created_at: datetime, payload: dict[str, Any]) -> Path:
    """Write a run's verdict file and `latest.json`; returns the latter."""
    write_json(outputs.of_run(created_at), payload)
    write_json(outputs.latest, payload)
    return outputs.latest
