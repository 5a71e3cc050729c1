"""Several processes under ``torchrun``: the candidates of a search step are split across ranks and the
results all-gathered (torch.distributed; NCCL on GPUs, gloo on CPUs), so every rank makes the same choice.

With tensor parallelism (``tp`` > 1) the ranks form groups of ``tp`` consecutive ranks that hold one model
between them (transformers' tensor-parallel plan): the candidates are split across the groups, every rank
of a group evaluates the same ones, and one answer per group is kept."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    rank: int = 0
    world: int = 1
    tp: int = 1  # ranks per model (tensor parallel group)

    @classmethod
    def from_env(cls, device: str = "cpu", tp: int = 1) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % tp:
            raise ValueError(f"--tp {tp} does not divide the {world} processes")
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), tp=tp)

    @property
    def groups(self) -> int:
        """How many model replicas split the candidates."""
        return self.world // self.tp

    @property
    def group(self) -> int:
        """This rank's model replica (tensor-parallel group): every rank of a group runs the same forwards."""
        return self.rank // self.tp

    def split(self, items: Sequence) -> list:
        return list(items[self.group :: self.groups])

    def gather(self, obj) -> list:
        """Every replica's ``obj``, in replica order (one per tensor-parallel group)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out[:: self.tp]

    def agree_min(self, value: float) -> float:
        """The smallest ``value`` over all ranks: budgets that decide what a rank recomputes (the prefix
        cache's) must be the same on every rank of a tensor-parallel group, or their forwards diverge."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return min(out)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


__all__ = ["Dist"]
