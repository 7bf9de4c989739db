"""What the kit's two caches hold on disk, and removing entries nobody uses: ``vision-tl cache``.

* the **feature cache** (:mod:`vision_tl.features.cache`): one folder per backbone setting,
  ``<root>/<backbone>/<key>/``, holding ``meta.json`` (what produced the features), shards
  ``<id>.feats.npy`` / ``.sum.json`` / ``.keys.npy`` and ``stats.json``;
* the **decoded-image cache** (:mod:`vision_tl.data.decoded_cache`): ``<key>.npy`` (pixels)
  and ``<key>.json`` (image count, size) per split and input size.

An entry is only recognised by those names *and* its metadata (a feature store's folder name
is the hash of its ``meta.json``), so a root pointed at the wrong folder (``--features ~``)
lists nothing and loses nothing: only files named as the caches name them are ever deleted.
"Last used" is the newest modification time of an entry's files: the kit touches an entry's
metadata file each time it opens it, and access times are not kept on most mounts.

Runs hold the entries they read or write (a shared ``flock``, :func:`hold_in_use`); an entry
is deleted only under an exclusive lock taken without waiting, so one in use is skipped.
This module imports neither torch nor the caches' modules: ``vision-tl cache list`` answers
at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_tl.utils import files as _files
from vision_tl.utils.files import ORPHAN_AGE_S, exclusive_if_unused, orphan_age_s

KINDS = ("features", "decoded")
# (the environment variables and default folders of the feature cache and the decoded-image cache:
# defined here, where no torch is imported, and used by both)
ENV = {"features": "VISION_TL_CACHE", "decoded": "VISION_TL_DECODED_CACHE"}
NAMES = {"features": "feature cache", "decoded": "decoded-image cache"}
OPTIONS = {"features": "--features", "decoded": "--decoded"}

_STORE_KEY = re.compile(r"[0-9a-f]{20}")
_STORE_FILE = re.compile(r"(?:meta\.json|stats\.json|[0-9a-f]{16}\.(?:feats\.npy|sum\.json|keys\.npy))")
_DECODED_FILE = re.compile(r"([0-9a-f]{24})\.(npy|json)")
# temporary files (as vision_tl.utils.files names them), and files a clear renamed to delete them
# (see _remove) that are still there: a clear killed in between, or one that could not finish
_TEMP = r"\.(?:{names})\.(?:[A-Za-z0-9_]+-\d+\.[A-Za-z0-9_]{{8}}\.tmp|deleted-[0-9a-f]{{8}})"
_STORE_TEMP = re.compile(_TEMP.format(names=_STORE_FILE.pattern))
_DECODED_TEMP = re.compile(_TEMP.format(names=r"[0-9a-f]{24}\.(?:npy|json)"))
# a store folder a clear renamed to delete it (one step: the store is gone for every run at once)
_DELETED_STORE = re.compile(r"[0-9a-f]{20}\.deleted-[0-9a-f]{8}")
_MAX_DEPTH = 4  # <root>/<backbone, which may hold a '/'>/<key>: how deep stores are looked for


class CacheAdminError(ValueError):
    """A cache root or an option that cannot be used; the message names it and what would do."""


@dataclass
class CacheRoot:
    """One cache folder: its kind, where it is and where that came from (for messages)."""

    kind: str
    path: Path
    origin: str  # "--features", "$VISION_TL_CACHE" or "the default"

    @property
    def exists(self) -> bool:
        return self.path.is_dir()


@dataclass
class CacheEntry:
    """One entry: what deleting it removes (``files``, then the folder ``path`` if emptied)."""

    kind: str
    path: Path  # a feature store's folder; a decoded entry's .npy; a temporary file
    description: str
    details: dict
    files: list[Path]
    bytes: int
    last_used: float  # newest mtime of ``files`` (seconds since the epoch)
    in_use: bool = False
    removable_folder: bool = False  # a store folder below the root: removed once empty
    note: str = field(default="", repr=False)


def default_root(kind: str) -> Path:
    """``$VISION_TL_CACHE`` / ``$VISION_TL_DECODED_CACHE`` if set, else ``~/.cache/vision_tl/<kind>``."""
    env = os.environ.get(ENV[kind])
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vision_tl" / kind


def cache_root(kind: str, path: str | Path | None = None) -> CacheRoot:
    """The root of ``kind`` (``features`` or ``decoded``): ``path`` if given, which must be an
    existing folder, else the default, which need not exist (nothing is cached there yet)."""
    if kind not in KINDS:
        raise CacheAdminError(f"unknown cache kind {kind!r}; expected one of: {', '.join(KINDS)}")
    if path is None:
        origin = f"${ENV[kind]}" if os.environ.get(ENV[kind]) else "the default"
        root = CacheRoot(kind, default_root(kind), origin)
        if root.path.exists() and not root.path.is_dir():
            raise CacheAdminError(f"{NAMES[kind]} {root.path} ({origin}) is a file, not a folder; "
                                  f"point {OPTIONS[kind]} DIR or ${ENV[kind]} at the cache folder")
        return root
    if isinstance(path, str) and not path.strip():
        raise CacheAdminError(f"{OPTIONS[kind]}: an empty path (an unset shell variable?); give the "
                              f"{NAMES[kind]} folder, or leave {OPTIONS[kind]} out for {default_root(kind)}")
    root = CacheRoot(kind, Path(path).expanduser(), OPTIONS[kind])
    if not root.path.exists():
        raise CacheAdminError(f"{NAMES[kind]} folder {root.path} ({OPTIONS[kind]}) does not exist; give an "
                              f"existing folder, or leave {OPTIONS[kind]} out for {default_root(kind)}")
    if not root.path.is_dir():
        raise CacheAdminError(f"{NAMES[kind]} {root.path} ({OPTIONS[kind]}) is a file, not a folder; give "
                              "the folder that holds the cache")
    return root


def list_entries(root: CacheRoot, check_use: bool = True) -> list[CacheEntry]:
    """The recognised entries under ``root``, oldest use first; ``check_use`` also asks each
    whether a process holds it (a lock taken and released at once)."""
    if not root.exists:
        return []
    found = _feature_entries(root.path) if root.kind == "features" else _decoded_entries(root.path)
    if check_use:
        for entry in found:
            entry.in_use = entry.in_use or not _unused(entry)
    return sorted(found, key=lambda e: (e.last_used, str(e.path)))


def _unused(entry: CacheEntry) -> bool:
    with exclusive_if_unused(_lock_target(entry)) as free:
        return free


def _lock_target(entry: CacheEntry) -> Path:
    """What a run holds while it uses the entry: the store folder, the pixel file, the temp file."""
    return entry.path if entry.path.exists() else entry.files[0]


# ---------------------------------------------------------------------------- feature cache


def store_key(identity: dict) -> str:
    """The folder name :class:`vision_tl.features.cache.FeatureCache` gives a store (``FeatureCache.key``)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _feature_entries(root: Path) -> list[CacheEntry]:
    """Every store folder ``<root>/<backbone>/<key>`` whose key is its ``meta.json``'s hash, and
    the root itself where it is one store (``meta.json`` in it, a cache pinned to one setting)."""
    entries = []
    pinned = _store_entry(root, pinned=True)
    if pinned is not None:
        entries.append(pinned)
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        for sub in _subfolders(folder):
            if _DELETED_STORE.fullmatch(sub.name) and depth >= 1:
                entries.append(_deleted_store_entry(sub))
                continue
            if _STORE_KEY.fullmatch(sub.name) and depth >= 1:
                entry = _store_entry(sub)
                if entry is not None and sub.parent.relative_to(root).as_posix() == entry.details["backbone"]:
                    entries.append(entry)
                    continue
            if depth + 1 < _MAX_DEPTH and not sub.name.startswith("."):
                stack.append((sub, depth + 1))
    return entries


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:  # unreadable: nothing of ours can be listed in it
        return []


def _store_entry(folder: Path, pinned: bool = False) -> CacheEntry | None:
    """The store in ``folder``, or None where ``folder`` is not one of ours."""
    identity = _read_dict(folder / "meta.json")
    if not {"format", "backbone", "num_features", "preprocessing"} <= set(identity):
        return None
    if not pinned and store_key(identity) != folder.name:
        return None
    files, bytes_, last = _store_files(folder)
    images = sum(_npy_rows(p) for p in files if p.name.endswith(".keys.npy"))
    files.sort(key=lambda p: (not p.name.endswith(".keys.npy"), p.name == "meta.json"))  # commit markers first
    prep = identity.get("preprocessing") if isinstance(identity.get("preprocessing"), dict) else {}
    size = prep.get("input_size") or ["?", "?"]
    stages = ",".join(str(s) for s in identity.get("stages", ["pooled"]))
    extra = "".join(f", {k} {identity[k]}" for k in ("precision", "decode") if k in identity)
    view = f", view {identity['view']}" if identity.get("view") not in (None, 0, "clean") else ""
    details = {"backbone": str(identity["backbone"]), "input_size": list(size), "stages": stages,
               "num_features": identity["num_features"], "images": images}
    what = f"{identity['backbone']} {size[0]}x{size[1]} {stages}{extra}{view}: {images:,} images"
    committed = {p.name.split(".", 1)[0] for p in files if p.name.endswith(".keys.npy")}
    # features without their keys file (the commit marker): a killed run's last shard, or what an
    # earlier version's clear left of a store whose shards a reader held open (it deleted keys first)
    uncommitted = {p.name.split(".", 1)[0] for p in files if p.name.endswith(".feats.npy")} - committed
    if uncommitted:
        what += f" (+{len(uncommitted)} shards without keys: a killed write's or an unfinished delete's)"
        details["uncommitted_shards"] = len(uncommitted)
    return CacheEntry("features", folder, what, details, files, bytes_, last, removable_folder=not pinned)


def _store_files(folder: Path) -> tuple[list[Path], int, float]:
    """A store folder's own files, the bytes they take and their newest modification time. A file
    gone since the folder was read (a writer's temporary file, renamed into place) is left out."""
    files, stats = [], []
    for path in _own_files(folder, _STORE_FILE, _STORE_TEMP):
        with contextlib.suppress(FileNotFoundError):
            stats.append(path.lstat())
            files.append(path)
    return files, sum(_disk_bytes(st) for st in stats), max((st.st_mtime for st in stats), default=0.0)


def _deleted_store_entry(folder: Path) -> CacheEntry:
    """A store folder a clear renamed to delete it and could not empty (killed, or a file that
    could not be deleted): no run reads it any more, so it always goes, as temporary files do."""
    files, bytes_, last = _store_files(folder)
    return CacheEntry("features", folder, "store left by a cache clear that could not finish",
                      {"temporary": True}, files, bytes_, last or folder.lstat().st_mtime, removable_folder=True)


def _own_files(folder: Path, names: re.Pattern, temps: re.Pattern) -> list[Path]:
    """The regular files in ``folder`` named as a cache names its files or its temporary files."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if e.is_file(follow_symlinks=False)
                    and (names.fullmatch(e.name) or temps.fullmatch(e.name))]
    except OSError:
        return []


# ---------------------------------------------------------------------- decoded-image cache


def _decoded_entries(root: Path) -> list[CacheEntry]:
    """``<key>.npy`` + ``<key>.json`` pairs (and halves of one a killed build left), and the
    temporary files of killed builds."""
    keys: dict[str, dict[str, Path]] = {}
    temps = []
    for path in _own_files(root, _DECODED_FILE, _DECODED_TEMP):
        match = _DECODED_FILE.fullmatch(path.name)
        if match:
            keys.setdefault(match[1], {})[match[2]] = path
        else:
            temps.append(path)
    entries = [e for e in (_decoded_entry(root, key, parts) for key, parts in keys.items()) if e is not None]
    for path in temps:
        with contextlib.suppress(FileNotFoundError):  # (a build's temporary file, renamed into place since)
            entries.append(_temp_entry(path, "decoded"))
    return entries


def _decoded_entry(root: Path, key: str, parts: dict[str, Path]) -> CacheEntry | None:
    meta = _read_dict(parts["json"]) if "json" in parts else {}
    shape = _npy_shape(parts["npy"]) if "npy" in parts else None
    ours_meta = {"format", "count", "size"} <= set(meta)
    ours_npy = shape is not None and len(shape) == 4 and shape[3] == 3
    if not (ours_meta or ours_npy):
        return None
    files = [parts[k] for k in ("json", "npy") if k in parts and (k == "npy" and ours_npy or k == "json" and ours_meta)]
    stats = [p.lstat() for p in files]
    count = meta.get("count", shape[0] if shape else "?")
    size = meta.get("size") or (list(shape[1:3]) if shape else ["?", "?"])
    details = {"images": count, "input_size": list(size), "interpolation": meta.get("interpolation", "?"),
               "undecodable": len(meta.get("bad", []) or [])}
    what = f"{count:,} images at {size[0]}x{size[1]}" if isinstance(count, int) else f"images at {size[0]}x{size[1]}"
    in_use = False
    if not (ours_meta and ours_npy):
        # a build writes the .json just after renaming the .npy into place: a young half is being written
        newest = max(max(st.st_mtime, st.st_ctime) for st in stats)
        in_use = time.time() - newest < ORPHAN_AGE_S
        what += (", no .json: a killed build's, or an unfinished delete's" if ours_npy
                 else ", its .npy is missing")
    path = parts["npy"] if ours_npy else parts["json"]
    return CacheEntry("decoded", path, what, details, files, sum(_disk_bytes(st) for st in stats),
                      max(st.st_mtime for st in stats), in_use=in_use)


def _temp_entry(path: Path, kind: str) -> CacheEntry:
    """A temporary file of a writer: one at work holds it locked; a young one may not be locked yet
    (without locks, one that changed within a day may be at work: :func:`orphan_age_s`)."""
    st = path.lstat()
    if ".deleted-" in path.name:  # (renamed by a clear to delete it: no run writes it)
        return CacheEntry(kind, path, "file left by a cache clear that could not finish", {"temporary": True},
                          [path], _disk_bytes(st), st.st_mtime)
    return CacheEntry(kind, path, "temporary file of a killed run", {"temporary": True}, [path],
                      _disk_bytes(st), st.st_mtime, in_use=time.time() - st.st_mtime < orphan_age_s())


# ----------------------------------------------------------------------------------- helpers


def _read_dict(path: Path) -> dict:
    """A small JSON object file, or {} (missing, not JSON, not ours)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    """The shape in a ``.npy`` file's header, or None where it is not one."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(fh)
        return tuple(int(n) for n in shape)
    except (OSError, ValueError, EOFError, SyntaxError):
        return None


def _npy_rows(path: Path) -> int:
    shape = _npy_shape(path)
    return int(shape[0]) if shape else 0


def _disk_bytes(st: os.stat_result) -> int:
    """Bytes the file takes on disk (its blocks), or its size where blocks are not reported."""
    blocks = getattr(st, "st_blocks", None)
    return blocks * 512 if blocks is not None else st.st_size


def entry_bytes(root: str | Path, kind: str = "features") -> dict[Path, int]:
    """Bytes each recognised entry under ``root`` takes, by its path ({} where there is no such folder)."""
    try:
        return {e.path: e.bytes for e in list_entries(CacheRoot(kind, Path(root), ""), check_use=False)}
    except Exception:  # noqa: BLE001 (a size note is never worth failing a run over)
        return {}


def cache_note(root: str | Path, kind: str = "decoded", before: dict[Path, int] | None = None) -> str | None:
    """One line on a cache's size, for a command that has just added to it (a scan of its
    folder: a stat per file). With ``before`` (:func:`entry_bytes` taken before the run) the
    entries that grew since are named with their own size, as ``vision-tl cache list`` shows
    them (the total alone reads like the size of the entry just written), and None is returned
    where none grew. Never raises: a note is not worth failing a run over."""
    try:
        entries = list_entries(CacheRoot(kind, Path(root), ""), check_use=False)
    except Exception:  # noqa: BLE001 (anything: the run's own work is done and must not fail here)
        return None if before is not None else "see vision-tl cache clear --help to prune it"
    grown = [e for e in entries if before is not None and before.get(e.path) != e.bytes]
    if before is not None and not grown:
        return None
    total = sum(e.bytes for e in entries)
    own = "".join(f"; this run's entry {entry_name(Path(root), e.path)} takes {format_bytes(e.bytes)}" for e in grown)
    return (f"the {NAMES[kind]} in {root} holds {format_bytes(total)} in {count_entries(len(entries))}{own} "
            "(vision-tl cache clear --help to prune it)")


def entry_name(root: Path, path: Path) -> str:
    """An entry's name in ``vision-tl cache list``: its path below the root (``.`` for the root itself)."""
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


def count_entries(n: int) -> str:
    """``1 entry``, ``3 entries``."""
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def format_bytes(n: int) -> str:
    """``1.5 GiB``: binary units, as the decoded-image cache reports its files."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# ---------------------------------------------------------------------------------- removing


@dataclass
class ClearReport:
    """What :func:`clear_entries` did (or, dry, would do) with each entry it was given."""

    deleted: list[CacheEntry] = field(default_factory=list)
    busy: list[CacheEntry] = field(default_factory=list)  # in use by a run: left alone
    failed: list[tuple[CacheEntry, str]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.deleted)


def unused_for(entries: list[CacheEntry], days: float | None, now: float | None = None) -> list[CacheEntry]:
    """The entries not used for ``days`` (all with None); temporary files of killed runs always."""
    if days is None:
        return list(entries)
    cutoff = (time.time() if now is None else now) - days * 86400
    return [e for e in entries if e.details.get("temporary") or e.last_used < cutoff]


def clear_entries(root: CacheRoot, entries: list[CacheEntry], days: float | None = None,
                  dry_run: bool = True) -> ClearReport:
    """Delete ``entries`` of ``root`` (each under an exclusive lock taken without waiting: one a
    run holds is skipped), or with ``dry_run`` only sort them into what would go and what is busy.
    ``days``: an entry used meanwhile (newer than that) is kept after all."""
    report = ClearReport()
    cutoff = None if days is None else time.time() - days * 86400
    for entry in entries:
        if entry.in_use:
            report.busy.append(entry)
            continue
        with exclusive_if_unused(_lock_target(entry)) as free:
            if not free:
                report.busy.append(entry)
            elif cutoff is not None and not entry.details.get("temporary") and _newest(entry) >= cutoff:
                report.busy.append(entry)  # read by a run between the listing and now
            elif dry_run:
                report.deleted.append(entry)
            else:
                try:
                    _remove(root, entry)
                    report.deleted.append(entry)
                except PermissionError as exc:
                    if _files.fcntl is None:  # Windows: a file a process holds open cannot be deleted
                        report.busy.append(entry)
                    else:  # POSIX deletes open files: the folder's permissions refused it
                        report.failed.append((entry, exc.strerror or str(exc)))
                except OSError as exc:
                    report.failed.append((entry, exc.strerror or str(exc)))
    return report


def _remove_store_folder(entry: CacheEntry) -> None:
    """:func:`_remove` for a store folder (see there)."""
    folder = entry.path
    tomb = folder.with_name(f"{folder.name}.deleted-{secrets.token_hex(4)}")
    os.rename(folder, tomb)  # (Windows: PermissionError while a file in it is open; nothing changed)
    try:
        for path in _own_files(tomb, _STORE_FILE, _STORE_TEMP):  # (shards a run added since the listing too)
            path.unlink(missing_ok=True)
    except OSError:  # (a file opened this very instant, permissions): what is left gets its name back
        with contextlib.suppress(OSError):
            os.rename(tomb, folder)
        raise
    try:
        tomb.rmdir()
    except OSError:  # files that are not the cache's: they stay, under the folder's own name
        with contextlib.suppress(OSError):
            os.rename(tomb, folder)


def _unlink_whole(paths: list[Path]) -> None:
    """Delete ``paths`` in order; where an open file cannot be deleted (no locks: Windows), all
    or none: each is renamed first, and a refusal renames those back before it is raised."""
    if _files.fcntl is not None:  # POSIX deletes open files; runs in use were skipped under the lock
        for path in paths:
            path.unlink(missing_ok=True)
        return
    tag = secrets.token_hex(4)
    staged: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            if os.path.lexists(path):
                staged.append((path, path.with_name(f".{path.name}.deleted-{tag}")))
                os.rename(*staged[-1])
    except OSError:
        staged.pop()  # (the one refused)
        for path, tomb in reversed(staged):
            with contextlib.suppress(OSError):
                os.rename(tomb, path)
        raise
    for _, tomb in staged:
        tomb.unlink(missing_ok=True)


def _newest(entry: CacheEntry) -> float:
    times = []
    for path in entry.files:
        with contextlib.suppress(OSError):
            times.append(path.lstat().st_mtime)
    return max(times, default=0.0)


def _remove(root: CacheRoot, entry: CacheEntry) -> None:
    """Delete the entry whole, or leave it whole (the error raised then says why).

    A store folder is first renamed (``<key>.deleted-<tag>``): one step that takes the whole
    store from every run at once, and one that Windows refuses while any file in the folder is
    open (a run reading its shards), before anything is deleted. Its files are deleted after.
    Other entries' files go metadata and commit markers first (a reader never takes what is left
    for an entry); where an open file cannot be deleted (Windows) each is first renamed, and a
    refusal puts back those renamed. Names left by a clear killed in between are listed, and
    deleted by the next clear, as leftovers."""
    if entry.kind == "features" and entry.removable_folder and _STORE_KEY.fullmatch(entry.path.name):
        _remove_store_folder(entry)
    else:
        _unlink_whole(entry.files)
    if not entry.removable_folder:
        return
    for folder in (entry.path, *entry.path.parents):
        if folder == root.path or root.path not in folder.parents:
            break
        try:
            folder.rmdir()
        except FileNotFoundError:  # (the store folder, removed under its new name)
            continue
        except OSError:  # other files in it (not ours: kept)
            if folder == entry.path:
                entry.note = "its folder stays: it holds files that are not the cache's"
            break
