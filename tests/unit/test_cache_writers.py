"""Several writers into one feature-cache entry: two extractions into different outputs sharing a
cache, a fit beside an extraction, torchrun's ranks. Each image is embedded once and stored once.

The backbone is replaced by a stand-in that records what it embeds and takes a moment per batch,
so that the writers really overlap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vision_tl.data.folder import content_hash
from vision_tl.features import cache as cache_mod
from vision_tl.features.cache import FeatureCache
from vision_tl.features.claims import claimed
from vision_tl.features.extractor import BatchResult
from vision_tl.features.store import ShardStore
from vision_tl.utils.files import lock_folder, name_digest

IDENTITY = {"format": 1, "backbone": "tiny_net", "weights": "random", "state_digest": "0", "num_features": 4,
            "preprocessing": {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                              "interpolation": "bilinear"}, "stages": ["pooled"]}
EXTRACTOR = SimpleNamespace(backbone="tiny_net", identity=lambda: IDENTITY)


@pytest.fixture
def images(tmp_path: Path) -> tuple[list[Path], list[str]]:
    paths = []
    for i in range(30):
        paths.append(tmp_path / "images" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), i, np.uint8)).save(paths[-1])
    return paths, [content_hash(p) for p in paths]


@pytest.fixture
def embedded(monkeypatch) -> list[Path]:
    """Every image the stand-in backbone embeds, in order (0.02 s a batch)."""
    seen: list[Path] = []

    def iter_embeddings(extractor, files, batch_size=8, *args, **kwargs):
        for start in range(0, len(files), batch_size):
            time.sleep(0.02)
            batch = files[start:start + batch_size]
            seen.extend(batch)
            yield BatchResult(list(range(start, start + len(batch))), np.ones((len(batch), 4), np.float32), [])

    monkeypatch.setattr(cache_mod, "iter_embeddings", iter_embeddings)
    return seen


def _rows(root: Path) -> int:
    return sum(len(np.load(p)) for p in root.rglob("*.keys.npy"))


def _writer_holding_a_claim(store: ShardStore, keys: list[str], then: str = "    time.sleep(60)\n") -> subprocess.Popen:
    """Another process that claims ``keys`` in ``store``, prints 'claimed', then runs ``then``
    (indented code, in the claim's block) and holds the claim until it ends or is killed."""
    script = ("import sys, time\nimport numpy as np\nfrom vision_tl.features.claims import claimed\n"
              "from vision_tl.features.store import ShardStore\n"
              f"store = ShardStore({str(store.path)!r}, {IDENTITY!r})\n"
              f"with claimed(store, {keys!r}):\n    print('claimed', flush=True)\n" + then)
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "claimed"
    return other


def test_two_writers_sharing_images_embed_each_once(tmp_path, images, embedded):
    """Both found the shared images missing, both embedded them and both stored them: every row
    twice on disk, the work twice. Now the second waits for the first's and reads them."""
    paths, hashes = images
    shares = [slice(0, 20), slice(10, 30)]  # images 10-19 in both
    ready = threading.Barrier(2)
    reports, errors = {}, []

    def writer(n: int) -> None:
        try:
            ready.wait()
            reports[n] = FeatureCache(tmp_path / "cache").ensure(EXTRACTOR, paths[shares[n]], hashes[shares[n]],
                                                                 batch_size=4, progress=False)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == [] and len(reports) == 2
    assert sorted(embedded) == sorted(paths)  # each image once
    assert _rows(tmp_path / "cache") == len(paths)
    assert sum(r.computed for r in reports.values()) == len(paths)
    assert all(not r.failed for r in reports.values())
    assert FeatureCache(tmp_path / "cache").read(EXTRACTOR, hashes).shape == (30, 4)


def test_images_a_killed_writer_claimed_are_embedded_by_the_one_waiting(tmp_path, images, embedded):
    """The writer that claimed them is killed before storing them: its lock goes with it, and the
    one waiting for them embeds them itself, not waiting for good and not leaving them out."""
    paths, hashes = images
    store = FeatureCache(tmp_path / "cache").store(EXTRACTOR)
    other = _writer_holding_a_claim(store, hashes[:10])
    try:
        done = []
        waiting = threading.Thread(target=lambda: done.append(FeatureCache(tmp_path / "cache").ensure(
            EXTRACTOR, paths, hashes, batch_size=4, progress=False)))
        waiting.start()
        deadline = time.monotonic() + 20
        while len(embedded) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert sorted(embedded) == sorted(paths[10:])  # its own share, then it waits for the claimed ten
        assert waiting.is_alive()
        other.kill()
        waiting.join(timeout=30)
    finally:
        other.kill()
        other.wait()
    assert done and done[0].computed == len(paths) and sorted(embedded) == sorted(paths)
    assert _rows(tmp_path / "cache") == len(paths)
    # the waiting is not embedding: the rate stats.json keeps is the backbone's
    assert done[0].waited_seconds > 0
    stats = json.loads((FeatureCache(tmp_path / "cache").store(EXTRACTOR).path / "stats.json").read_text())
    assert stats["images_per_second"] == pytest.approx(len(paths) / done[0].seconds)


def test_a_claim_left_by_a_killed_process_is_ignored_and_removed(tmp_path, images, embedded):
    paths, hashes = images
    store = FeatureCache(tmp_path / "cache").store(EXTRACTOR)
    with claimed(store, hashes[:5]):
        (mine,) = lock_folder().glob(f"claims-{name_digest(store.path)}/{os.getpid()}-*.claim")
        left = mine.with_name("999999-0123abcd.claim")  # the same list, nobody holding it
        left.write_bytes(mine.read_bytes())
    report = FeatureCache(tmp_path / "cache").ensure(EXTRACTOR, paths, hashes, batch_size=4, progress=False)
    assert report.computed == len(paths) and not left.exists()


def test_a_writer_without_claims_stores_no_row_another_stored_meanwhile(tmp_path):
    """Without locks (Windows), or between users sharing a cache, nothing is claimed: the rows
    another writer stored since this one indexed the store are left out of its shard."""
    first, second = ShardStore(tmp_path / "s", IDENTITY), ShardStore(tmp_path / "s", IDENTITY)
    keys = [f"{i:064x}" for i in range(6)]
    assert len(first) == len(second) == 0  # both indexed the empty store
    first.append(keys[:4], np.ones((4, 4), np.float32))
    second.append(keys[2:], np.full((4, 4), 2, np.float32))
    assert _rows(tmp_path / "s") == 6 and len(second) == 6
    assert ShardStore(tmp_path / "s", IDENTITY).read(keys)[:, 0].tolist() == [1, 1, 1, 1, 2, 2]


def test_a_temporary_folder_without_locks_embeds_unclaimed_instead_of_failing(tmp_path, images, embedded,
                                                                                 monkeypatch):
    """A temporary folder whose file system refuses flock (ENOLCK: NFS without its lock daemon):
    every lock of a run is then a courtesy it goes without. The writers' lock, now taken by every
    append, raised there, so no extraction or fit could store a row."""
    import errno
    import fcntl

    from vision_tl.utils import files

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files, "fcntl", SimpleNamespace(**{k: getattr(fcntl, k) for k in dir(fcntl)
                                                          if k.startswith("LOCK_")}, flock=flock))
    paths, hashes = images
    report = FeatureCache(tmp_path / "cache").ensure(EXTRACTOR, paths, hashes, batch_size=4, progress=False)
    assert report.computed == len(paths) and _rows(tmp_path / "cache") == len(paths)


def test_a_writer_that_stopped_storing_what_it_claimed_is_waited_for_no_longer(tmp_path, images, embedded,
                                                                               monkeypatch, capsys):
    """A live writer that holds its claim but stores nothing (stopped with Ctrl-Z, hung on a
    network drive) kept the other waiting for good; after the stall time the waiting one embeds
    those images itself, once, and says why."""
    from vision_tl.features import claims

    paths, hashes = images
    store = FeatureCache(tmp_path / "cache").store(EXTRACTOR)
    monkeypatch.setattr(claims, "STALL_S", 1.0)
    other = _writer_holding_a_claim(store, hashes[:10], "    time.sleep(120)\n")
    try:
        report = FeatureCache(tmp_path / "cache").ensure(EXTRACTOR, paths, hashes, batch_size=4, progress=False)
        assert other.poll() is None  # still holding its claim
    finally:
        other.kill()
        other.wait()
    assert report.computed == len(paths) and sorted(embedded) == sorted(paths)
    assert _rows(tmp_path / "cache") == len(paths)
    assert f"none of the images waited for reached the cache from pid {other.pid} in 1 s" in capsys.readouterr().out


def test_a_writer_waits_only_until_the_images_it_waits_for_are_stored(tmp_path, images, embedded):
    """The writer holding the claim stores its images a shard at a time, and may have hours of
    others to embed after them, or hang: the one waiting blocked until that writer's claim was
    released, although every image it waited for was in the store."""
    paths, hashes = images
    store = FeatureCache(tmp_path / "cache").store(EXTRACTOR)
    other = _writer_holding_a_claim(store, hashes[:10], "    sys.stdin.readline()\n"
                                    f"    store.append({hashes[:10]!r}, np.full((10, 4), 2, np.float32))\n"
                                    "    time.sleep(60)\n")
    try:
        done = []
        waiting = threading.Thread(target=lambda: done.append(FeatureCache(tmp_path / "cache").ensure(
            EXTRACTOR, paths, hashes, batch_size=4, progress=False)), daemon=True)
        waiting.start()
        deadline = time.monotonic() + 20
        while len(embedded) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        other.stdin.write("store\n")
        other.stdin.flush()
        waiting.join(timeout=30)
        assert not waiting.is_alive() and other.poll() is None  # back while the other still holds its claim
    finally:
        other.kill()
        other.wait()
    assert done and done[0].computed == 20 and sorted(embedded) == sorted(paths[10:])
    assert FeatureCache(tmp_path / "cache").read(EXTRACTOR, hashes)[:, 0].tolist() == [2.0] * 10 + [1.0] * 20


def test_an_interrupted_writer_keeps_the_rows_it_embedded(tmp_path, images, monkeypatch):
    """Ctrl-C (or SIGTERM, taken as one) before a shard filled up threw away every image embedded
    so far: the next run embedded them all again. Now they are stored on the way out."""
    paths, hashes = images

    def iter_embeddings(extractor, files, batch_size=8, *args, **kwargs):
        for start in range(0, 16, batch_size):
            yield BatchResult(list(range(start, start + batch_size)), np.ones((batch_size, 4), np.float32), [])
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "iter_embeddings", iter_embeddings)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path / "cache").ensure(EXTRACTOR, paths, hashes, batch_size=8, progress=False)
    store = FeatureCache(tmp_path / "cache").store(EXTRACTOR)
    assert [key in store for key in hashes] == [True] * 16 + [False] * 14


def test_an_interrupt_between_a_batchs_keys_and_its_rows_stays_an_interrupt(tmp_path, images, monkeypatch):
    """Ctrl-C after a batch's keys were queued but before its rows were: the rows embedded before
    it are stored and the interrupt goes on up (it once became "16 keys for 8 feature rows")."""
    paths, hashes = images

    interrupts = [KeyboardInterrupt()]

    class Interrupted(np.ndarray):
        def __getitem__(self, item):  # (the rows of the kept images are taken after their keys)
            if interrupts:
                raise interrupts.pop()
            return np.asarray(self)[item]

    def iter_embeddings(extractor, files, batch_size=8, *args, **kwargs):
        yield BatchResult(list(range(8)), np.ones((8, 4), np.float32), [])
        yield BatchResult(list(range(8, 16)), np.ones((8, 4), np.float32).view(Interrupted), [])

    monkeypatch.setattr(cache_mod, "iter_embeddings", iter_embeddings)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path / "cache").ensure(EXTRACTOR, paths, hashes, batch_size=8, progress=False)
    store = FeatureCache(tmp_path / "cache").store(EXTRACTOR)
    assert [key in store for key in hashes] == [True] * 8 + [False] * 22
