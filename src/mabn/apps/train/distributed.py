"""The process group of a ``torchrun`` launch, and the device of each process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["Distributed", "select_device"]


class Distributed:
    """The process group of a ``torchrun`` launch (world size 1 without one)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    def init(self, device: torch.device) -> None:
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def close(self, finished: bool = True) -> None:
        """Destroy the process group once every process has finished (after a barrier, so none tears it down early).

        After an error nothing is torn down: the other processes may be inside a collective, where a
        teardown would wait for them forever; the process exits with the error and torchrun ends the
        others.
        """
        if not (self.active and dist.is_initialized()):
            return
        if finished:
            dist.barrier()
            dist.destroy_process_group()


def select_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(name)
