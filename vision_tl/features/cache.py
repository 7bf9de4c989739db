"""``FeatureCache``: backbone features keyed by file content, reused across runs.

Layout: ``<root>/<backbone>/<key>/`` is one :class:`ShardStore`, where ``key`` is a
hash of everything the features depend on (backbone, weights identity and a
digest of the actual weights, preprocessing, stages, augmentation view, timm
version), and rows inside it are keyed by the image's sha256. So:

* changing an image's bytes changes its key: the row is recomputed;
* changing the input size, weights or stages picks another store directory;
* a store whose ``meta.json`` does not match what is asked is refused, never used;
* a damaged shard (see :mod:`vision_tl.features.store`) is deleted with a warning and
  its images are computed again, so damaged bytes never become features.

The root defaults to ``$VISION_TL_CACHE`` or ``~/.cache/vision_tl/features``.
A root that is itself a store (has ``meta.json``) is used only for the exact
settings that wrote it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision_tl.caches.inventory import ENV, default_root, store_key
from vision_tl.data.folder import content_hash
from vision_tl.features.claims import claimed, wait_for
from vision_tl.features.extractor import FeatureExtractor, iter_embeddings, progress_label
from vision_tl.features.store import FeatureStoreError, ShardStore, read_json
from vision_tl.utils.files import atomic_write_text, unwritable

CACHE_ENV = ENV["features"]
SHARD_ROWS = 256  # rows per shard: a killed run redoes at most this many images (Ctrl-C, SIGTERM: none)
WHERE_ELSE = ("point it at a writable folder with --cache-dir DIR (vision-tl extract, probe) or "
              "--model.feature_cache DIR (vision-tl fit), or set $VISION_TL_CACHE; vision-tl extract "
              "can also run with --no-cache")


class FeatureCacheError(FeatureStoreError):
    """A cache that cannot be used for the features asked for; the message names it."""


def default_cache_dir() -> Path:
    """``$VISION_TL_CACHE`` if set, else ``~/.cache/vision_tl/features``."""
    return default_root("features")


@dataclass
class CacheReport:
    """What one :meth:`FeatureCache.ensure` call did."""

    requested: int
    computed: int
    failed: list[tuple[Path, str]]
    seconds: float  # embedding, not waiting for another writer's images (``waited_seconds``)
    first_batch_seconds: float = float("nan")  # until the first batch's features were back
    waited_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.computed and self.seconds > 0 else float("nan")


def failure_listing(bad: list[tuple], limit: int = 20) -> str:
    """One indented line per ``(path, why)``, the path named once (loaders' messages often start with it)."""
    lines = [f"  {why}" if str(why).startswith(str(path)) else f"  {path}: {why}" for path, why in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


class FeatureCache:
    """Content-keyed features on disk; computes only what is missing.

    Args:
        root: cache directory; ``None`` uses :func:`default_cache_dir`.

    Example:
        >>> cache = FeatureCache("/tmp/feature-cache")
        >>> fx = FeatureExtractor(create_backbone("tf_efficientnet_lite0"), "tf_efficientnet_lite0", prep)
        >>> feats = cache.features(fx, [s.path for s in index.samples], [s.sha256 for s in index.samples])
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        if self.root.exists() and not self.root.is_dir():
            raise FeatureCacheError(f"feature cache {self.root} is a file; expected a directory: {WHERE_ELSE}")

    @staticmethod
    def key(identity: dict) -> str:
        return store_key(identity)

    def store(self, extractor: FeatureExtractor) -> ShardStore:
        """The store for this extractor's settings; refuses a store written by other settings."""
        identity = extractor.identity()
        pinned = (self.root / "meta.json").is_file()
        path = self.root if pinned else self.root / extractor.backbone / self.key(identity)
        try:
            return ShardStore(path, identity)
        except FeatureStoreError as exc:
            raise FeatureCacheError(str(exc)) from exc
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise FeatureCacheError(f"feature cache {self.root} is not writable (cannot create {path}: "
                                        f"{exc.strerror}); {WHERE_ELSE}") from exc
            raise FeatureCacheError(f"cannot use feature cache {path}: {exc}") from exc

    def _check_writable(self, store: ShardStore, missing: int) -> None:
        """Fail before any image is computed when the new features could not be stored."""
        reason = unwritable(store.path)
        if reason:
            raise FeatureCacheError(
                f"feature cache {self.root} is not writable ({reason} in {store.path}) and "
                f"{missing} image(s) have no cached features yet; {WHERE_ELSE}")

    def ensure(self, extractor: FeatureExtractor, paths: Sequence[Path], hashes: Sequence[str],
               batch_size: int = 8, num_workers: int | None = 0, device=None,
               progress: bool | str = True) -> CacheReport:
        """Compute and store the features of every image whose hash is not cached yet (images
        another process is embedding into the same store meanwhile are waited for and read, not
        embedded twice: :mod:`vision_tl.features.claims`)."""
        if len(paths) != len(hashes):
            raise ValueError(f"{len(paths)} paths but {len(hashes)} hashes")
        store = self.store(extractor)
        store.verify(list(hashes))  # damaged shards are dropped here, so their images count as missing
        todo: dict[str, Path] = {}
        copies: dict[str, list[Path]] = {}  # byte-identical files: embedded once, failed together
        for path, key in zip(paths, hashes):
            if key not in store:
                copies.setdefault(key, []).append(Path(path))
                todo.setdefault(key, Path(path))
        if todo:
            self._check_writable(store, len(todo))
        if progress and len(todo) < sum(map(len, copies.values())):  # (a bar of 191 for 192 files, unexplained)
            extra = sum(map(len, copies.values())) - len(todo)
            progress = (f"{progress_label(extractor, progress)}"
                        f" ({extra} byte-identical {'copy' if extra == 1 else 'copies'} embedded once)")
        key_of = {path: key for key, path in todo.items()}
        failed: list[tuple[Path, str]] = []
        computed, start, first, waited = 0, time.perf_counter(), float("nan"), 0.0
        stalled: set[str] = set()  # claimed by a writer that stopped storing them: embedded here
        while todo:
            with claimed(store, list(todo), take_over=stalled) as claim:
                if claim.mine:
                    files = [todo[k] for k in claim.mine]
                    first_batch, failures = _embed_into(store, extractor, claim.mine, files, batch_size,
                                                        num_workers, device, progress)
                    first = first_batch if math.isnan(first) else first  # (the first pass's)
                    computed += len(files) - len(failures)
                    failed += failures
            wait_start = time.perf_counter()
            if not wait_for(claim, store):
                stalled |= claim.theirs
            waited += time.perf_counter() - wait_start
            store.refresh()
            # what another writer claimed and did not store (killed; an image it could not decode): ours now
            todo = {k: todo[k] for k in claim.theirs if k not in store}
        failed = _with_copies(failed, copies, key_of)
        # (the rate in stats.json and extract's output is the backbone's: time spent waiting for
        # another writer's images is left out of it)
        report = CacheReport(len(paths), computed, failed, time.perf_counter() - start - waited, first, waited)
        if report.computed and report.computed >= self._stats(store).get("images", 0):
            # the largest run is the one whose rate says most about the backbone (a run that
            # embedded one new image measured mostly its start-up)
            atomic_write_text(store.path / "stats.json", json.dumps(
                {"images_per_second": report.images_per_second, "images": report.computed}))
        return report

    @staticmethod
    def _stats(store) -> dict:
        """The store's ``stats.json``; {} when missing or damaged (this run's replaces it)."""
        path = store.path / "stats.json"
        try:
            stats = read_json(path) if path.is_file() else {}
        except FeatureStoreError:
            return {}
        return stats if isinstance(stats, dict) and isinstance(stats.get("images", 0), int) else {}

    def throughput(self, extractor: FeatureExtractor) -> float:
        """Images/s of the largest run that computed features into this store (nan if unknown,
        or if its ``stats.json`` is damaged: a speed note is not worth failing a probe over)."""
        rate = self._stats(self.store(extractor)).get("images_per_second")
        return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else float("nan")

    def read(self, extractor: FeatureExtractor, hashes: Sequence[str]) -> np.ndarray:
        """``[len(hashes), num_features]`` from the store (every hash must be cached)."""
        return self.store(extractor).read(list(hashes))

    def features(self, extractor: FeatureExtractor, paths: Sequence[Path], hashes: Sequence[str],
                 **kwargs) -> np.ndarray:
        """:meth:`ensure` then :meth:`read`; raises if an image could not be decoded."""
        report = self.ensure(extractor, paths, hashes, **kwargs)
        if report.failed:
            raise ValueError(f"{len(report.failed)} image(s) could not be decoded:\n{failure_listing(report.failed)}")
        return self.read(extractor, hashes)


def _embed_into(store: ShardStore, extractor: FeatureExtractor, keys: list[str], files: list[Path],
                batch_size: int, num_workers: int | None, device, progress: bool | str
                ) -> tuple[float, list[tuple[Path, str]]]:
    """Embed ``files`` (whose content hashes are ``keys``) into ``store``, a shard at a time;
    the seconds until the first batch was back, and the files that failed, with why."""
    failed: list[tuple[Path, str]] = []
    pending_keys: list[str] = []
    pending: list[np.ndarray] = []
    start, first = time.perf_counter(), float("nan")
    # closed at once if a check below raises: its decoding threads stop there, not at the next GC
    embedded = iter_embeddings(extractor, files, batch_size, num_workers, device, progress)
    with contextlib.closing(embedded):
        try:
            for batch in embedded:
                if math.isnan(first):
                    first = time.perf_counter() - start
                _check_finite(extractor, batch.features, [files[i] for i in batch.positions])
                # A file rewritten between the scan and its decoding (a line folder being written to)
                # holds other content than its key names: its features would be stored under another
                # image's hash for good. Such an image is a failure, never a cache entry.
                kept = []
                for k, i in enumerate(batch.positions):
                    if content_hash(files[i]) == keys[i]:
                        kept.append(k)
                    else:
                        failed.append((files[i], _CHANGED.format(path=files[i])))
                pending_keys += [keys[batch.positions[k]] for k in kept]
                pending.append(batch.features[kept])
                failed += [(files[i], why) for i, why in batch.failures]
                if len(pending_keys) >= SHARD_ROWS:
                    store.append(pending_keys, np.concatenate(pending))
                    pending_keys, pending = [], []
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM taken as one: the next run starts after these
            # (an interrupt between extending the keys and the rows leaves the last batch's keys
            # without rows: store only the keys that have theirs)
            rows = np.concatenate(pending) if pending else np.zeros((0, 0))
            if len(rows):
                store.append(pending_keys[:len(rows)], rows)
            raise
    store.append(pending_keys, np.concatenate(pending) if pending else np.zeros((0, 0)))
    return first, failed


def _with_copies(failed: list[tuple[Path, str]], copies: dict[str, list[Path]],
                 key_of: dict[Path, str]) -> list[tuple[Path, str]]:
    """``failed``, each with the byte-identical copies of its file that were not embedded on
    their own (one file per content is): they have no features either."""
    out = []
    for path, why in failed:
        out.append((path, why))
        out += [(other, f"{other}: the same bytes as {path}, which could not be embedded")
                for other in copies.get(key_of.get(path, ""), []) if other != path]
    return out


_CHANGED = ("{path}: changed while it was being embedded (its content is no longer the one scanned); "
            "run the extraction again once the folder is no longer being written to")


def _check_finite(extractor: FeatureExtractor, features: np.ndarray, files: list[Path]) -> None:
    """Refuse to cache NaN/inf features: they would poison every later run that reads them."""
    features = np.asarray(features)
    if not features.size:
        return
    bad = ~np.isfinite(features.reshape(len(features), -1)).all(axis=1)
    if bad.any():
        names = ", ".join(str(files[i]) for i in np.flatnonzero(bad)[:5])
        raise FeatureCacheError(
            f"backbone {extractor.backbone} produced NaN or infinite features for {int(bad.sum())} image(s) "
            f"({names}); nothing was cached for them. Check the backbone weights; with --precision bf16, "
            "try --precision 32")
