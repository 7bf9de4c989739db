"""Where features live on disk: content-keyed shard stores and the ``.npz`` / Parquet outputs.

A :class:`ShardStore` is a directory holding ``meta.json`` (what produced the
features) and shards appended as extraction goes: ``<id>.feats.npy`` (float32
rows), ``<id>.sum.json`` (CRC-32 of both files, rows, width) and ``<id>.keys.npy``
(the content hash of each row). Each file is written atomically (temporary name,
then ``os.replace``) and the keys file last, so a shard without its keys file is
an interrupted write and is ignored. A killed extraction therefore loses at most
the shard it was filling; the next run reads the finished shards and skips those
images.

Every shard is checked before its rows are used: when the store is indexed, that
its keys load and the ``.npy`` header of its features matches them (dtype, rows,
width, file size); before its rows are first read, that both files still have the
CRC-32 recorded when they were written (shards of older versions have none: only
the rest is checked) and that every value is finite. A damaged shard (bit rot,
a disk that filled up, a power loss) is deleted with a warning naming it: it is
our cache, not user data, and its images are simply computed again.

The outputs are written by streaming from a store, one chunk of rows at a time:
a 100,000-image folder never needs all its embeddings in memory.

Parquet is written with **pyarrow**: it is the reference Parquet
implementation, streams row groups with ``ParquetWriter``, stores the embedding
as one ``fixed_size_list<float32>`` column that reads back zero-copy into a 2-D
numpy array, and carries our metadata in the schema, all without pandas.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import time
import uuid
import warnings
import weakref
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_tl.utils.files import (
    ORPHAN_AGE_S,
    already_there,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    file_crc32,
    hold_in_use,
    path_lock,
    path_text,
    remove_orphaned_temps_in,
    unwritable,
)

OUTPUT_FORMATS = (".npz", ".parquet")
META_KEY = "vision_tl"  # key of our JSON metadata in the .npz and in the Parquet schema


class FeatureStoreError(ValueError):
    """A feature file or store that cannot be used as asked; the message names it."""


class ShardStore:
    """Append-only, content-keyed feature rows in one directory (see module docstring).

    Args:
        path: the store directory (created when missing).
        identity: what produced the rows (backbone, weights, preprocessing, ...);
            written to ``meta.json`` on creation and compared on every open.
    """

    def __init__(self, path: str | Path, identity: dict) -> None:
        self.path = Path(path)
        self.identity = identity
        meta = self.path / "meta.json"
        _hold_in_use(self)  # before meta.json is read: a cache clear then leaves the store alone
        if meta.exists():
            stored = read_json(meta)
            if stored != identity:
                raise FeatureStoreError(_mismatch_message(self.path, stored, identity))
            with contextlib.suppress(OSError):  # its time is the store's "last used" (vision-tl cache list)
                os.utime(meta)
        else:
            atomic_write_text(meta, json.dumps(identity, indent=1, sort_keys=True))
        self._index: dict[str, tuple[str, int]] | None = None
        self._mmaps: dict[str, np.ndarray] = {}
        self._rows: dict[str, int] = {}  # rows per indexed shard, for the warnings
        self._dropped: set[str] = set()  # shards found damaged (not indexed again)
        if self.path not in _SWEPT:
            _SWEPT.add(self.path)
            self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """What killed writers left here: their temporary files, and shards written up to their
        features or checksums but never committed (no keys file) for over a minute (a live
        writer writes the three files within milliseconds). Shards have fresh names, so no
        later write would ever replace them."""
        remove_orphaned_temps_in(self.path, r"[0-9a-f]{16}\.(?:feats\.npy|sum\.json|keys\.npy)")
        keys = {p.name[: -len(".keys.npy")] for p in self.path.glob("*.keys.npy")}
        now = time.time()
        for part in [*self.path.glob("*.feats.npy"), *self.path.glob("*.sum.json")]:
            shard = part.name.split(".", 1)[0]
            with contextlib.suppress(OSError):
                if shard not in keys and now - part.stat().st_mtime > ORPHAN_AGE_S:
                    part.unlink()

    def shard_ids(self) -> list[str]:
        """Finished shards (keys file present), oldest first."""
        return self.shard_ids_of(list(self.path.glob("*.keys.npy")))

    @staticmethod
    def shard_ids_of(keys_files: list[Path]) -> list[str]:
        """The finished shards among those of ``keys_files`` (features present), oldest first."""
        found = []
        for path in keys_files:
            with contextlib.suppress(FileNotFoundError):  # (deleted meanwhile: a damaged shard, a clear)
                found.append((path.stat().st_mtime_ns, path.name, path))
        return [p.name[: -len(".keys.npy")] for _, _, p in sorted(found)
                if p.with_name(p.name.replace(".keys", ".feats")).exists()]

    def index(self) -> dict[str, tuple[str, int]]:
        """Content hash -> (shard id, row) over every finished shard whose files are consistent.

        A shard whose keys do not load or whose features header does not match them is
        deleted with a warning (see :meth:`discard`) and its rows are not indexed.
        """
        if self._index is None:
            self._index = {}
            self._add_to_index(self.shard_ids())
        return self._index

    def _add_to_index(self, shards: list[str]) -> None:
        """Index ``shards``' rows (an image already indexed keeps its first row); a damaged one is discarded."""
        for shard in shards:
            try:
                keys = self._load_keys(shard)
            except _DamagedShard as exc:
                self.discard(shard, str(exc))
                continue
            self._rows[shard] = len(keys)
            for row, key in enumerate(keys):
                self._index.setdefault(key, (shard, row))

    def refresh(self) -> None:
        """Index the shards other processes finished since this store was indexed (its other
        writers: torchrun's ranks, another extraction or fit sharing the cache)."""
        if self._index is None:
            self.index()
            return
        known = self._rows.keys() | self._dropped
        # (a listing of names, and a stat only for new shards: called before every append)
        new = [p for p in self.path.glob("*.keys.npy") if p.name[: -len(".keys.npy")] not in known]
        self._add_to_index(self.shard_ids_of(new))

    def writers_lock(self):
        """The lock under which a writer adds rows, or decides which it will compute (see
        :mod:`vision_tl.features.claims`): held for milliseconds, never while embedding. Its own
        name: an extraction without the cache holds the lock of its partial folder throughout."""
        return path_lock(self.path / ".writers")

    def __contains__(self, key: str) -> bool:
        return key in self.index()

    def __len__(self) -> int:
        return len(self.index())

    def append(self, keys: list[str], features: np.ndarray) -> None:
        """Write one shard atomically: features, then their checksums, keys last (the commit marker).

        Rows whose key another process stored meanwhile are left out (one row per image on disk,
        also where two writers computed it: see :mod:`vision_tl.features.claims`)."""
        if len(keys) != len(features):
            raise ValueError(f"{len(keys)} keys for {len(features)} feature rows")
        if not keys:
            return
        with self.writers_lock():
            self.refresh()
            new = [i for i, key in enumerate(keys) if key not in self.index()]
            if len(new) < len(keys):
                keys, features = [keys[i] for i in new], np.asarray(features)[new]
            if keys:
                self._write_shard(keys, features)

    def _write_shard(self, keys: list[str], features: np.ndarray) -> None:
        shard = f"{uuid.uuid4().hex[:16]}"
        features = np.ascontiguousarray(features, dtype=np.float32)
        feats_bytes, keys_bytes = _npy_bytes(features), _npy_bytes(np.asarray(keys, dtype="U64"))
        # fresh names: nothing of an earlier writer to sweep (the store clears its own leftovers
        # when it is opened, see _remove_leftovers)
        try:
            atomic_write_bytes(self.path / f"{shard}.feats.npy", feats_bytes, sweep=False)
            atomic_write_text(self.path / f"{shard}.sum.json", json.dumps(
                {"rows": len(keys), "width": int(features.shape[1]), "feats_crc32": zlib.crc32(feats_bytes),
                 "keys_crc32": zlib.crc32(keys_bytes)}), sweep=False)
            atomic_write_bytes(self.path / f"{shard}.keys.npy", keys_bytes, sweep=False)
        except OSError as exc:
            for part in (f"{shard}.feats.npy", f"{shard}.sum.json"):  # an uncommitted shard is of no use
                (self.path / part).unlink(missing_ok=True)
            raise FeatureStoreError(
                f"feature cache {self.path}: cannot write {shard}.feats.npy ({exc.strerror or exc}); the features "
                "computed so far are kept there; free space, or point $VISION_TL_CACHE (--cache-dir) at another "
                "disk") from exc
        _VERIFIED.add(_stamp(self.path / f"{shard}.feats.npy"))  # written from memory just now
        index = self.index()
        self._rows[shard] = len(keys)
        for row, key in enumerate(keys):
            index.setdefault(key, (shard, row))

    def verify(self, keys: list[str]) -> list[str]:
        """Check, in full, every shard holding one of ``keys`` (checksum, finite values).

        Damaged shards are deleted with a warning and drop out of the index, so their keys
        are missing again and get recomputed. Returns the ids of the shards dropped.
        """
        index = self.index()
        shards = dict.fromkeys(index[k][0] for k in keys if k in index)
        dropped = [shard for shard in shards if not self._verified(shard)]
        if dropped:
            self._index = None  # a key may also live in a sound shard: index again
            self.index()
        return dropped

    def read(self, keys: list[str]) -> np.ndarray:
        """Rows for ``keys`` in order, read through memory maps (only these rows load).

        Raises:
            FeatureStoreError: a shard holding some of ``keys`` is damaged (it is deleted;
                computing the features again, e.g. running the command again, refills it).
        """
        index = self.index()
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"{len(missing)} key(s) not in feature store {self.path}: {missing[:3]}")
        dropped = self.verify(keys)
        if dropped:
            raise FeatureStoreError(
                f"{len(dropped)} damaged shard(s) of feature cache {self.path} were deleted "
                f"({', '.join(f'{s}.feats.npy' for s in dropped)}); run again to recompute their features")
        width = int(self.identity["num_features"])
        out = np.empty((len(keys), width), np.float32)
        for i, key in enumerate(keys):
            shard, row = index[key]
            if shard not in self._mmaps:
                self._mmaps[shard] = np.load(self.path / f"{shard}.feats.npy", mmap_mode="r")
            out[i] = self._mmaps[shard][row]
        return out

    def discard(self, shard: str, why: str) -> None:
        """Warn about a damaged shard and delete its files (keys first: the commit marker)."""
        feats = self.path / f"{shard}.feats.npy"
        rows = self._rows.get(shard)
        images = f"its {rows} image(s)" if rows is not None else "its images"
        try:
            for suffix in (".keys.npy", ".sum.json", ".feats.npy"):
                (self.path / f"{shard}{suffix}").unlink(missing_ok=True)
            done = (f"deleted it and its .keys.npy (a cache file, not your data); {images} will be "
                    "computed again")
        except OSError as exc:
            done = (f"could not delete it ({exc.strerror or exc}), so it is ignored; delete {self.path}/"
                    f"{shard}.* to get rid of it")
        self._mmaps.pop(shard, None)
        self._dropped.add(shard)
        warnings.warn(f"feature cache shard {feats} is damaged ({why}); {done}", stacklevel=3)

    # ------------------------------------------------------------------ checks

    def _load_keys(self, shard: str) -> list[str]:
        """The shard's keys, after checking its keys file and its features header against them."""
        keys_path, feats_path = self.path / f"{shard}.keys.npy", self.path / f"{shard}.feats.npy"
        summary = _read_summary(self.path / f"{shard}.sum.json")
        try:
            if file_crc32(keys_path) != summary["keys_crc32"]:
                raise _DamagedShard(f"{keys_path.name} does not match the checksum written with it")
            keys = np.load(keys_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise _DamagedShard(f"{keys_path.name} cannot be read: {_why(exc)}") from exc
        if keys.ndim != 1 or keys.dtype.kind != "U":
            raise _DamagedShard(f"{keys_path.name} holds {keys.dtype} {keys.shape}, expected one string per row")
        width = int(self.identity["num_features"])
        shape, offset = _npy_header(feats_path)
        expected = (len(keys), width)
        if shape != expected:
            raise _DamagedShard(f"its header says {shape[0] if shape else '?'} rows x "
                                f"{shape[1] if len(shape) > 1 else '?'} float32, expected {expected[0]} x {width}")
        size = feats_path.stat().st_size
        if size != offset + 4 * len(keys) * width:
            raise _DamagedShard(f"{size:,} bytes where header and keys make {offset + 4 * len(keys) * width:,}")
        if (summary.get("rows"), summary.get("width")) != expected:
            raise _DamagedShard(f"{shard}.sum.json records {summary.get('rows')} x {summary.get('width')}")
        return keys.tolist()

    def _verified(self, shard: str) -> bool:
        """Full check of one shard's features (once per process); discards it when damaged."""
        feats_path = self.path / f"{shard}.feats.npy"
        try:
            stamp = _stamp(feats_path)
            if stamp in _VERIFIED:
                return True
            summary = _read_summary(self.path / f"{shard}.sum.json")
            if file_crc32(feats_path) != summary["feats_crc32"]:
                raise _DamagedShard("its bytes do not match the checksum written with it")
            rows = np.load(feats_path, mmap_mode="r")
            finite = all(np.isfinite(rows[i:i + 4096]).all() for i in range(0, len(rows), 4096))
            if not finite:
                raise _DamagedShard("it holds NaN or infinite values")
        except _DamagedShard as exc:
            self.discard(shard, str(exc))
            return False
        except (OSError, ValueError, EOFError) as exc:
            self.discard(shard, f"it cannot be read: {_why(exc)}")
            return False
        _VERIFIED.add(stamp)
        return True


class _DamagedShard(Exception):
    """One shard's files are inconsistent; the message says how."""


# Shards whose features passed the full check in this process: (path, inode, size, mtime_ns). Shard
# files are never modified once renamed into place, so one check per process is enough.
_VERIFIED: set[tuple[str, int, int, int]] = set()
_SWEPT: set[Path] = set()  # stores whose leftovers this process removed already


def _stamp(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


def _why(exc: BaseException) -> str:
    return str(exc) or f"{type(exc).__name__} (an empty or cut-off file)"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npy_header(path: Path) -> tuple[tuple[int, ...], int]:
    """``(shape, data offset)`` of a float32 C-order ``.npy`` file; raises :class:`_DamagedShard`."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unknown .npy format version {version}")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
    except (OSError, ValueError, EOFError) as exc:
        raise _DamagedShard(f"its header cannot be read: {_why(exc)}") from exc
    if dtype != np.float32 or fortran or len(shape) != 2:
        raise _DamagedShard(f"its header says {dtype} {shape}, expected 2-D float32")
    return tuple(shape), offset


def _read_summary(path: Path) -> dict:
    """A shard's recorded checksums. A shard is written features, checksums, keys: one with keys
    but no checksums lost its file afterwards (or predates checksums), and is not trusted."""
    if not path.exists():
        raise _DamagedShard(f"its checksum file {path.name} is missing")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(summary.get(k), int) for k in ("rows", "width", "feats_crc32", "keys_crc32")):
            raise ValueError("missing fields")
        return summary
    except (OSError, ValueError, AttributeError) as exc:
        raise _DamagedShard(f"{path.name} cannot be read: {exc}") from exc


def _hold_in_use(store: ShardStore) -> None:
    """Create the store's folder and hold it in use while ``store`` lives (see
    :func:`hold_in_use`), so ``vision-tl cache clear`` skips it; made again where a clear
    removed it this very instant."""
    for _ in range(3):
        store.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = hold_in_use(store.path)
        except FileNotFoundError:
            continue
        if fd is not None:
            weakref.finalize(store, os.close, fd)
        return


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FeatureStoreError(f"cannot read {path}: {exc}; delete it and run again") from exc


def _mismatch_message(path: Path, stored: dict, wanted: dict) -> str:
    diffs = [f"{k}: stored {stored.get(k)!r}, wanted {wanted.get(k)!r}"
             for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    return (f"feature cache {path} was written for different settings ({'; '.join(diffs)}); "
            "it is never reused for another backbone, weights or preprocessing. Point the cache "
            "at a parent directory (each setting gets its own sub-folder) or delete it")


# ---------------------------------------------------------------------------------- outputs


@dataclass
class FeatureSet:
    """Embeddings plus where they came from, as returned by ``extract`` and ``read_features``.

    Attributes:
        features: ``[N, F]`` float32.
        paths: image paths relative to the extracted root.
        labels: class index per row, -1 where the folder has no classes.
        classes: class names (empty for an unlabelled folder).
        sha256: content hash per row.
        metadata: backbone, weights identity, preprocessing, stages, feature width.
    """

    features: np.ndarray
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    sha256: list[str]
    metadata: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        # (the dataclass's own repr printed the whole feature array and every path and hash)
        rows, width = self.features.shape[0], self.features.shape[-1] if self.features.ndim > 1 else 0
        return (f"FeatureSet({rows} images x {width} features, classes={self.classes}, "
                f"backbone={self.metadata.get('backbone')!r}, stages={self.metadata.get('stages')})")


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Validate an output path before any work: known suffix, parent exists, no clobbering."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise FeatureStoreError(
            f"output {path}: unknown format {path.suffix or '(no suffix)'!r}; expected one of: "
            f"{', '.join(OUTPUT_FORMATS)}"
        )
    if not path.parent.is_dir():
        raise FeatureStoreError(f"output {path}: directory {path.parent} does not exist; create it first")
    if path.is_dir():  # --overwrite replaces a file, never a folder
        raise FeatureStoreError(f"output {path} is a directory; name a {path.suffix} file to write")
    there = already_there(path)
    if there and not overwrite:
        raise FeatureStoreError(f"output {path} {there}; pass --overwrite (Python: overwrite=True) to replace it")
    reason = unwritable(path.parent)  # before the work, not after it
    if reason:
        raise FeatureStoreError(f"output {path}: cannot write in {path.parent} ({reason}); write "
                                "--out to a folder you can write to")
    return path


RowChunk = tuple[np.ndarray, list[str], np.ndarray, list[str]]  # features, paths, labels, sha256


def write_features(path: Path, chunks: Iterator[RowChunk], n_rows: int, metadata: dict,
                   overwrite: bool = False) -> None:
    """Stream row chunks into ``path`` (``.npz`` or ``.parquet``), atomically."""
    writer = _write_parquet if path.suffix.lower() == ".parquet" else _write_npz
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            writer(tmp, chunks, n_rows, metadata)
    except OSError as exc:
        if not _disk_full(exc):
            raise
        raise FeatureStoreError(f"output {path}: the disk is full ({exc.strerror or exc}); nothing was written "
                                "there; free space, or write the output to another disk") from exc


def _disk_full(exc: OSError) -> bool:
    """A full disk or quota, also as pyarrow reports it (an OSError without an errno)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)


def _npy_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype):
    """Open ``name.npy`` inside the zip for streaming: write the header, return the handle."""
    handle = zf.open(f"{name}.npy", "w", force_zip64=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape}
    np.lib.format.write_array_header_2_0(handle, header)
    return handle


def _write_npz(path: Path, chunks: Iterator[RowChunk], n_rows: int, metadata: dict) -> None:
    # Features stream straight into the archive; the small per-row columns are kept
    # (a few MB for 100k rows) and written once their total length is known.
    width = int(metadata["num_features"])
    paths: list[str] = []
    labels: list[np.ndarray] = []
    hashes: list[str] = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with _npy_member(zf, "features", (n_rows, width), np.float32) as handle:
            written = 0
            for feats, chunk_paths, chunk_labels, chunk_hashes in chunks:
                handle.write(np.ascontiguousarray(feats, np.float32).tobytes())
                written += len(feats)
                paths += chunk_paths
                labels.append(np.asarray(chunk_labels, np.int64))
                hashes += chunk_hashes
        if written != n_rows:
            raise RuntimeError(f"wrote {written} feature rows, expected {n_rows}")
        columns = {
            "paths": np.asarray(paths, dtype=str),
            "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
            "sha256": np.asarray(hashes, dtype="U64"),
            "classes": np.asarray(metadata.get("classes", []), dtype=str),
            META_KEY: np.asarray(json.dumps(metadata)),
        }
        for name, array in columns.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)


def _write_parquet(path: Path, chunks: Iterator[RowChunk], n_rows: int, metadata: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = int(metadata["num_features"])
    classes = list(metadata.get("classes", []))
    # path: text for people and pandas (bytes that are not UTF-8 shown as \xNN); path_bytes: the
    # file name's own bytes, which read_features turns back into the path npz keeps (it opens the file)
    schema = pa.schema(
        [("path", pa.string()), ("label", pa.string()), ("label_index", pa.int64()),
         ("sha256", pa.string()), ("features", pa.list_(pa.float32(), width)), ("path_bytes", pa.binary())],
        metadata={META_KEY: json.dumps(metadata)},
    )
    with pq.ParquetWriter(str(path), schema) as writer:
        for feats, chunk_paths, chunk_labels, chunk_hashes in chunks:
            flat = pa.array(np.ascontiguousarray(feats, np.float32).reshape(-1))
            names = [classes[i] if i >= 0 else None for i in np.asarray(chunk_labels).tolist()]
            table = pa.Table.from_arrays(
                [pa.array([path_text(p) for p in chunk_paths], pa.string()), pa.array(names, pa.string()),
                 pa.array(np.asarray(chunk_labels, np.int64)), pa.array(chunk_hashes, pa.string()),
                 pa.FixedSizeListArray.from_arrays(flat, width),
                 pa.array([os.fsencode(str(p)) for p in chunk_paths], pa.binary())],
                schema=schema,
            )
            writer.write_table(table)


def read_features(path: str | Path) -> FeatureSet:
    """Read a file written by ``vision-tl extract`` (``.npz`` or ``.parquet``).

    Example:
        >>> fs = read_features("neu_lite0.parquet")
        >>> fs.features.shape, fs.metadata["backbone"]
        ((1800, 1280), 'tf_efficientnet_lite0')
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FeatureStoreError(f"feature file {path} does not exist")
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path)
    if path.suffix.lower() != ".npz":
        raise FeatureStoreError(f"{path}: unknown format; expected one of: {', '.join(OUTPUT_FORMATS)}")
    try:
        with np.load(path, allow_pickle=False) as data:
            metadata = json.loads(str(data[META_KEY]))
            return FeatureSet(data["features"], data["paths"].tolist(), data["labels"],
                              data["classes"].tolist(), data["sha256"].tolist(), metadata)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise FeatureStoreError(f"{path} is not a vision-tl feature file ({exc})") from exc


def _read_parquet(path: Path) -> FeatureSet:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
        metadata = json.loads(table.schema.metadata[META_KEY.encode()])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise FeatureStoreError(f"{path} is not a vision-tl feature file ({exc})") from exc
    column = table.column("features").combine_chunks()
    width = int(metadata["num_features"])
    features = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)
    paths = ([os.fsdecode(b) for b in table.column("path_bytes").to_pylist()]
             if "path_bytes" in table.column_names else table.column("path").to_pylist())  # (earlier files)
    return FeatureSet(features, paths,
                      table.column("label_index").to_numpy(), list(metadata.get("classes", [])),
                      table.column("sha256").to_pylist(), metadata)


def remove_store(path: Path) -> None:
    """Delete a store directory written by :class:`ShardStore` (only its own files)."""
    for child in path.rglob("*"):
        if child.is_file() and (child.name == "meta.json" or child.name.endswith((".npy", ".json", ".tmp"))):
            child.unlink()
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(child.iterdir()):
            child.rmdir()
    if path.is_dir() and not any(path.iterdir()):
        os.rmdir(path)
