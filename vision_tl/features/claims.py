"""Which images another process is embedding into the same feature store right now.

Two extractions into different outputs (or a fit and an extraction) that share a cache and
some images each found them missing, embedded them and stored them: the work done twice. So
before embedding, a writer *claims* the images it is missing that no other live writer claims:
a file listing their keys, held locked (``flock``) while it works, in this user's lock folder
(:func:`vision_tl.utils.files.lock_folder`). Images another writer claims are waited for (its
lock goes when it is done, or dies: the kernel drops a killed process's locks; or, before that,
the store holds them all: it stores them a shard at a time) and then read from the store; any it
did not store (killed, or an image it could not decode) are embedded then. Where none of them
reaches the store for five minutes (that writer is busy with others, stopped with Ctrl-Z, hung on
a network drive), the waiting one embeds them itself.

Claims are decided one writer at a time (:meth:`ShardStore.writers_lock`, held for
milliseconds), and a writer waits only once its own claim is released, holding no lock: no
wait can close a cycle. Disjoint work (torchrun's ranks, two folders without shared images)
never waits. Where there is no ``flock`` (Windows), or between users or machines sharing a
cache, nothing is claimed: :meth:`ShardStore.append` then leaves out rows another writer
stored meanwhile, so the work is doubled and the rows only where two appends of the same images
meet within milliseconds (the index keeps the first copy; nothing breaks).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vision_tl.features.store import ShardStore
from vision_tl.utils import files, say
from vision_tl.utils.files import lock_folder, name_digest

_CLAIM = re.compile(r"(?P<pid>\d+)-[0-9a-f]{8}\.claim")
# A waiting writer looks every STORE_CHECK_S whether the store holds the images it waits for
# (then it is done waiting), and embeds them itself once none of them reached the store for
# STALL_S (one shard takes seconds even on a small CPU); claims are looked at every POLL_S.
STALL_S = 300.0
STORE_CHECK_S = 1.0
POLL_S = 0.2


@dataclass
class Claim:
    """What one writer is to do: ``mine`` (keys it claimed and embeds) and ``theirs`` (keys
    another live writer claimed, with those writers' claim files, to wait for)."""

    mine: list[str]
    theirs: set[str] = field(default_factory=set)
    others: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def claimed(store: ShardStore, keys: list[str], take_over: set[str] | frozenset[str] = frozenset()) -> Iterator[Claim]:
    """Claim the ``keys`` the store lacks and no other writer claims (or that are in
    ``take_over``: those a writer that stalled claims, see :func:`wait_for`), for the block.

    Example:
        >>> with claimed(store, missing) as claim:
        ...     embed_and_append(claim.mine)
        >>> wait_for(claim)  # then read claim.theirs from the store (store.refresh())
    """
    folder = _claims_folder(store)
    if folder is None:  # no locks here: every missing key is this writer's
        yield Claim([k for k in keys if k not in store])
        return
    fd = None
    with store.writers_lock():
        store.refresh()
        keys = [k for k in keys if k not in store]
        wanted = set(keys)
        claim = Claim([])
        for other in sorted(folder.glob("*.claim")):
            held = _live_keys(other)
            if held is not None and not held.isdisjoint(wanted - take_over):
                claim.theirs |= held & (wanted - take_over)
                claim.others.append(other)
        claim.mine = [k for k in keys if k not in claim.theirs]
        if claim.mine:
            mine = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.claim"
            fd = _hold_claim(mine, claim.mine)
    try:
        yield claim
    finally:
        if fd is not None:  # the file first: a waiter that then finds it gone knows it is done
            with contextlib.suppress(OSError):
                os.unlink(mine)
            os.close(fd)


def wait_for(claim: Claim, store: ShardStore | None = None, stall_s: float | None = None) -> bool:
    """Wait until the writers holding ``claim.theirs`` are done (or dead), or, given the
    ``store``, until it holds every one of those images (a writer stores its images a shard at a
    time, and may have hours of others to embed after them), saying so. True then; False where,
    for ``stall_s`` seconds (:data:`STALL_S`), none of those images reached ``store``: a writer
    stopped (Ctrl-Z), hung on a network drive, or embedding slower than this process would alone.
    The caller then embeds what is left itself (pass those keys as ``take_over`` to
    :func:`claimed`); rows the other writer stores later are dropped on append."""
    if not claim.others:
        return True
    stall_s = STALL_S if stall_s is None else stall_s
    pids = sorted({m["pid"] for p in claim.others if (m := _CLAIM.fullmatch(p.name))}, key=int)
    who = f"other processes (pids {', '.join(pids)}); waiting for them" if len(pids) > 1 else \
        f"another process (pid {''.join(pids) or '?'}); waiting for it"
    say(f"vision_tl: {len(claim.theirs)} of these images are being embedded into the same feature cache by "
        f"{who}, then reading them from the cache")
    pending, stored = list(claim.others), -1
    progress_at = checked_at = time.monotonic()
    while True:
        pending = [other for other in pending if _held(other)]
        if not pending:
            return True
        now = time.monotonic()
        if store is not None and now - checked_at >= min(STORE_CHECK_S, stall_s / 2):
            checked_at = now
            store.refresh()
            done = sum(key in store for key in claim.theirs)
            if done == len(claim.theirs):
                return True
            if done > stored:
                stored, progress_at = done, now
        if now - progress_at >= stall_s:
            say(f"vision_tl: none of the images waited for reached the cache from pid {', '.join(pids) or '?'} "
                f"in {stall_s:.0f} s (busy with others, stopped or hung); embedding the rest of them here")
            return False
        time.sleep(POLL_S)


def _held(path: Path) -> bool:
    """Whether a live writer still holds the claim file ``path`` (False once it is gone).

    The same lock probe as :func:`_live_keys`, kept apart because it runs where that one may not:
    :func:`wait_for` polls it every :data:`POLL_S` without the writers' lock, so it only looks and
    changes nothing (it neither reads the keys, known since :func:`claimed`, nor removes a claim
    nobody holds: the next :func:`claimed` sweeps that, under the lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # done already
        return False
    try:
        files.fcntl.flock(fd, files.fcntl.LOCK_SH | files.fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # (no longer lockable: nothing to wait for)
        return False
    finally:
        os.close(fd)  # (releases a lock just taken)
    return False


def _hold_claim(path: Path, keys: list[str]) -> int | None:
    """Create the claim file ``path`` listing ``keys``, locked; its descriptor (None where the
    lock cannot be had: the keys are then embedded unclaimed, as without locks)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        files.fcntl.flock(fd, files.fcntl.LOCK_EX | files.fcntl.LOCK_NB)  # (a new file: nobody else holds it)
        os.write(fd, "\n".join(keys).encode())
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        return None
    return fd


def _claims_folder(store: ShardStore) -> Path | None:
    """This store's claims folder, or None where claims cannot be held (no ``flock``)."""
    if files.fcntl is None:
        return None
    try:
        folder = lock_folder() / f"claims-{name_digest(store.path)}"
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    return folder


def _live_keys(path: Path) -> set[str] | None:
    """The keys a live writer's claim file lists; None for one whose writer is gone (a killed
    process's claim, which nobody holds locked: removed here) or that is gone already.

    Only under :meth:`ShardStore.writers_lock`, as :func:`claimed` calls it: :func:`_hold_claim`
    creates a claim file before it locks it and writes the keys, so outside that lock a new claim
    could be read half written, or taken for a killed writer's and removed (:func:`_held` is
    the probe for outside it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            files.fcntl.flock(fd, files.fcntl.LOCK_SH | files.fcntl.LOCK_NB)
        except BlockingIOError:  # its writer holds it: at work
            with open(fd, "rb", closefd=False) as fh:
                return set(fh.read().decode().split())
        except OSError:
            return None
        path.unlink(missing_ok=True)  # a killed writer's (claims are made and read under the writers' lock)
        return None
    finally:
        os.close(fd)
