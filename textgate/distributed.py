"""Several training processes on one machine (torchrun / DDP): who this process is, and the
few collectives the training loop needs, each a no-op in a single process.

`torchrun` (`python -m torch.distributed.run`) starts one process per GPU (or per share of
the CPUs) and tells each its place through environment variables; `World.from_env` reads
them. Rank 0 is the main process: it alone writes files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Environment variables torchrun sets in every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# A slow rank 0 (saving, ONNX export) must not make the others time out at the next collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; the defaults are a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank among the processes on this machine: which GPU it uses
    local_size: int = 1  # processes on this machine: they share its CPUs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> World:
        """The world torchrun describes in the environment; a single process without it."""
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls()
        size = int(environ["WORLD_SIZE"])
        return cls(
            rank=int(environ.get("RANK", "0")),
            size=size,
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            local_size=int(environ.get("LOCAL_WORLD_SIZE", str(size))),
        )


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its vars)."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in TORCHRUN_ENV)


def resolve_processes(requested: int | str, device: torch.device) -> int:
    """`train.processes` as a count: auto = one per CUDA GPU when training on CUDA, else 1."""
    if requested != "auto":
        return int(requested)
    return max(1, torch.cuda.device_count()) if device.type == "cuda" else 1


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(world: World, device: torch.device) -> torch.device:
    """The device of this process: on CUDA, GPU number `local_rank` (one GPU per process)."""
    if device.type != "cuda" or not world.distributed:
        return device
    return torch.device("cuda", world.local_rank)


def init_process_group(world: World, device: torch.device) -> None:
    """Join the other processes (a no-op in a single process or when already joined)."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend_for(device),
        rank=world.rank,
        world_size=world.size,
        timeout=COLLECTIVE_TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(world: World, value: Any) -> list[Any]:
    """Every process's `value`, in rank order (`[value]` in a single process)."""
    if not world.distributed:
        return [value]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(world: World, values: Sequence[float]) -> list[float]:
    """Element-wise sums of `values` over the processes."""
    if not world.distributed:
        return [float(value) for value in values]
    return [
        float(sum(column)) for column in zip(*all_gather_objects(world, list(values)), strict=True)
    ]


def all_reduce_max(world: World, value: float) -> float:
    """The largest `value` over the processes."""
    return float(max(all_gather_objects(world, value)))


def torchrun_command(processes: int, module: str, args: Sequence[str]) -> list[str]:
    """The command that runs `python -m module args` in `processes` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a rendezvous on a free local port: no master address to configure
        f"--nproc_per_node={processes}",
        "-m",
        module,
        *args,
    ]
