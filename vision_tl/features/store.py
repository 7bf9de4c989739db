"""Where features live on disk: content-keyed shard stores and the ``.npz`` / Parquet outputs.

A :class:`ShardStore` is a directory holding ``meta.json`` (what produced the
features) and shards appended as extraction goes: ``<id>.feats.npy`` (float32
rows) and ``<id>.keys.npy`` (the content hash of each row). Each file is written
atomically (temporary name, then ``os.replace``) and the keys file last, so a
shard without its keys file is an interrupted write and is ignored. A killed
extraction therefore loses at most the shard it was filling; the next run reads
the finished shards and skips those images.

The outputs are written by streaming from a store, one chunk of rows at a time:
a 100,000-image folder never needs all its embeddings in memory.

Parquet is written with **pyarrow**: it is the reference Parquet
implementation, streams row groups with ``ParquetWriter``, stores the embedding
as one ``fixed_size_list<float32>`` column that reads back zero-copy into a 2-D
numpy array, and carries our metadata in the schema, all without pandas.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_tl.utils.files import atomic_path, atomic_write_text

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
        if meta.exists():
            stored = read_json(meta)
            if stored != identity:
                raise FeatureStoreError(_mismatch_message(self.path, stored, identity))
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(meta, json.dumps(identity, indent=1, sort_keys=True))
        self._index: dict[str, tuple[str, int]] | None = None
        self._mmaps: dict[str, np.ndarray] = {}

    def shard_ids(self) -> list[str]:
        """Finished shards (keys file present), oldest first."""
        keys = sorted(self.path.glob("*.keys.npy"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.name[: -len(".keys.npy")] for p in keys if p.with_name(p.name.replace(".keys", ".feats")).exists()]

    def index(self) -> dict[str, tuple[str, int]]:
        """Content hash -> (shard id, row) over every finished shard."""
        if self._index is None:
            self._index = {}
            for shard in self.shard_ids():
                keys = np.load(self.path / f"{shard}.keys.npy")
                for row, key in enumerate(keys.tolist()):
                    self._index.setdefault(key, (shard, row))
        return self._index

    def __contains__(self, key: str) -> bool:
        return key in self.index()

    def __len__(self) -> int:
        return len(self.index())

    def append(self, keys: list[str], features: np.ndarray) -> None:
        """Write one shard atomically: features first, keys last (the commit marker)."""
        if len(keys) != len(features):
            raise ValueError(f"{len(keys)} keys for {len(features)} feature rows")
        if not keys:
            return
        shard = f"{uuid.uuid4().hex[:16]}"
        features = np.ascontiguousarray(features, dtype=np.float32)
        with atomic_path(self.path / f"{shard}.feats.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, features)
        with atomic_path(self.path / f"{shard}.keys.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(keys, dtype="U64"))
        index = self.index()
        for row, key in enumerate(keys):
            index.setdefault(key, (shard, row))

    def read(self, keys: list[str]) -> np.ndarray:
        """Rows for ``keys`` in order, read through memory maps (only these rows load)."""
        index = self.index()
        missing = [k for k in keys if k not in index]
        if missing:
            raise KeyError(f"{len(missing)} key(s) not in feature store {self.path}: {missing[:3]}")
        width = int(self.identity["num_features"])
        out = np.empty((len(keys), width), np.float32)
        for i, key in enumerate(keys):
            shard, row = index[key]
            if shard not in self._mmaps:
                self._mmaps[shard] = np.load(self.path / f"{shard}.feats.npy", mmap_mode="r")
            out[i] = self._mmaps[shard][row]
        return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
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
    if path.exists() and not overwrite:
        raise FeatureStoreError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")
    return path


RowChunk = tuple[np.ndarray, list[str], np.ndarray, list[str]]  # features, paths, labels, sha256


def write_features(path: Path, chunks: Iterator[RowChunk], n_rows: int, metadata: dict,
                   overwrite: bool = False) -> None:
    """Stream row chunks into ``path`` (``.npz`` or ``.parquet``), atomically."""
    writer = _write_parquet if path.suffix.lower() == ".parquet" else _write_npz
    with atomic_path(path, overwrite=overwrite) as tmp:
        writer(tmp, chunks, n_rows, metadata)


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
    schema = pa.schema(
        [("path", pa.string()), ("label", pa.string()), ("label_index", pa.int64()),
         ("sha256", pa.string()), ("features", pa.list_(pa.float32(), width))],
        metadata={META_KEY: json.dumps(metadata)},
    )
    with pq.ParquetWriter(str(path), schema) as writer:
        for feats, chunk_paths, chunk_labels, chunk_hashes in chunks:
            flat = pa.array(np.ascontiguousarray(feats, np.float32).reshape(-1))
            names = [classes[i] if i >= 0 else None for i in np.asarray(chunk_labels).tolist()]
            table = pa.Table.from_arrays(
                [pa.array(chunk_paths, pa.string()), pa.array(names, pa.string()),
                 pa.array(np.asarray(chunk_labels, np.int64)), pa.array(chunk_hashes, pa.string()),
                 pa.FixedSizeListArray.from_arrays(flat, width)],
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
    return FeatureSet(features, table.column("path").to_pylist(),
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
