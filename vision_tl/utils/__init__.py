"""Small shared helpers (atomic files; which process of a multi-process job this is; work one
DDP process does while the others wait, in utils.distributed)."""

import os


def local_rank() -> int:
    """This process's rank on its machine in a DDP or torchrun job (``LOCAL_RANK``, which both
    set), 0 outside one. Messages every rank would repeat are printed by local rank 0 only."""
    return int(os.environ.get("LOCAL_RANK") or 0)
