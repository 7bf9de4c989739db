"""Work that one process of a DDP job does while the others wait for it (a cache they then read)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class OtherRankFailed(ValueError):
    """The process that builds a shared file failed; this rank stops with its message."""


def first_builds(strategy, first: bool, build: Callable[[], T]) -> T | None:
    """Run ``build`` on the processes where ``first`` is true while the others wait; ``build``'s
    result there, None elsewhere.

    The ranks meet in an all-gather instead of a bare barrier, so a failure reaches everyone:
    the builder raises its own error and every other rank an :class:`OtherRankFailed` with the
    same message (at a barrier they would die of a lost connection, with a traceback). Without
    a process group (one device) it is ``build()`` where ``first`` is true.
    """
    import torch.distributed as dist

    error: BaseException | None = None
    result = None
    if first:
        try:
            result = build()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the others
            error = exc
    if dist.is_available() and dist.is_initialized():
        reports: list = [None] * dist.get_world_size()
        dist.all_gather_object(reports, None if error is None else str(error))
    else:  # a strategy without a process group (tests, single device): its own barrier
        strategy.barrier("vision_tl-first-builds")
        reports = []
    if error is not None:
        raise error
    failed = next((message for message in reports if message), None)
    if failed is not None:
        raise OtherRankFailed(failed)
    return result


# What gloo and NCCL say when the process at the other end of a collective has exited.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed")


def peer_stopped(exc: BaseException) -> str | None:
    """A one-line message when ``exc`` is this process losing the other processes of its DDP
    job (one of them stopped on an error of its own, printed by it), else None."""
    import torch.distributed as dist

    if not (isinstance(exc, RuntimeError) and dist.is_available() and dist.is_initialized()):
        return None
    text = str(exc).lower()
    if not (isinstance(exc, getattr(dist, "DistBackendError", ())) or any(s in text for s in _PEER_GONE)):
        return None
    return (f"another process of this {dist.get_world_size()}-process run stopped (its error is printed above), "
            f"so process {dist.get_rank()} stops too")
