"""Several processes under ``torchrun``: the candidates of a search step are split across ranks and the
results all-gathered (torch.distributed; NCCL on GPUs, gloo on CPUs), so every rank makes the same choice."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: str = "cpu") -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    def split(self, items: Sequence) -> list:
        return list(items[self.rank :: self.world])

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

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
