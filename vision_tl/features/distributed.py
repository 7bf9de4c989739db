"""Extraction across processes (``torchrun``): each rank embeds its share into the shared
cache; rank 0 then writes the one output file from it.

The cache is content-keyed, and the output is assembled from it in the folder's order,
so a multi-process run writes the same rows in the same order as a single process::

    torchrun --nproc_per_node 4 -m vision_tl.cli extract ROOT --out emb.parquet
"""

from __future__ import annotations

from dataclasses import dataclass

from vision_tl.utils import launcher_int


@dataclass
class Ranks:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sync_module(self, module) -> None:
        """Give every rank rank 0's weights (random initialisation differs per process)."""
        if self.world > 1:
            import torch.distributed as dist

            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def gather(self, value):
        """Every rank's ``value``, in rank order (``[value]`` when not distributed)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def current_ranks() -> Ranks:
    """Join the process group a launcher (torchrun, srun) set up through the environment."""
    world = launcher_int("WORLD_SIZE", 1)
    if world <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL's collectives run on the current GPU: this rank's, not cuda:0
            torch.cuda.set_device(launcher_int("LOCAL_RANK") % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), launcher_int("LOCAL_RANK"))
