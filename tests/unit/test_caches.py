"""``vision-tl cache list | clear`` over real caches built by the kit's own cache APIs.

Each test builds its caches in ``tmp_path``: a decoded-image cache through
``decoded_images`` (tiny PNGs, no model) and a feature store through ``ShardStore`` under
the folder ``FeatureCache`` would give it (one test fills it with the tiny backbone).
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_tl.caches import inventory
from vision_tl.caches.cli import main
from vision_tl.cli import main as vision_tl_main
from vision_tl.data import decoded_cache as dc
from vision_tl.features import store as store_mod
from vision_tl.features.store import ShardStore
from vision_tl.utils.files import exclusive_if_unused, file_sha256, locked_temp

DAY = 86400.0
IDENTITY = {"format": 1, "backbone": "tiny_net", "weights": "random", "state_digest": "0", "num_features": 4,
            "preprocessing": {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                              "interpolation": "bilinear"}, "stages": ["pooled"]}


@pytest.fixture(autouse=True)
def new_process(monkeypatch) -> None:
    """Each test starts like a new run (no file known to be checked, no store swept)."""
    monkeypatch.setattr(store_mod, "_VERIFIED", set(), raising=False)
    monkeypatch.setattr(dc, "_VERIFIED", set(), raising=False)


@pytest.fixture
def images(tmp_path: Path) -> tuple[list[Path], list[str]]:
    paths = []
    for i in range(5):
        paths.append(tmp_path / "images" / f"{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((12, 10, 3), i * 40, np.uint8)).save(paths[-1])
    return paths, [file_sha256(p) for p in paths]


def _decoded(root: Path, images, n: int, size: int) -> Path:
    """One decoded entry of the first ``n`` images at ``size`` px; its ``.npy``."""
    paths, shas = images
    pixels, _ = dc.decoded_images(paths[:n], shas[:n], (size, size), "bilinear", root)
    name = Path(pixels.filename).name
    del pixels
    gc.collect()  # (the mapping held the entry in use)
    return root / name


def _store(root: Path, rows: int, backbone: str = "tiny_net") -> Path:
    """A feature store where FeatureCache puts one: ``<root>/<backbone>/<key>``."""
    from vision_tl.features.cache import FeatureCache

    identity = {**IDENTITY, "backbone": backbone}
    store = ShardStore(root / backbone / FeatureCache.key(identity), identity)
    store.append([f"{i:064x}" for i in range(rows)], np.ones((rows, 4), np.float32))
    path = store.path
    del store
    gc.collect()
    return path


def _age(paths, days: float) -> None:
    when = time.time() - days * DAY
    for path in paths:
        os.utime(path, (when, when))


def _entry_files(entry_path: Path) -> list[Path]:
    if entry_path.is_dir():
        return list(entry_path.iterdir())
    return [entry_path, entry_path.with_suffix(".json")]


def _json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _disk(paths) -> int:
    return sum(p.stat().st_blocks * 512 for p in paths)


def test_list_shows_each_entry_with_its_count_size_and_total(tmp_path, images, capsys):
    small, large = _decoded(tmp_path / "dec", images, 5, 8), _decoded(tmp_path / "dec", images, 3, 16)
    store = _store(tmp_path / "feat", rows=7)
    assert main(["list", "--features", str(tmp_path / "feat"), "--decoded", str(tmp_path / "dec")]) == 0
    out = capsys.readouterr().out
    assert "5 images at 8x8" in out and "3 images at 16x16" in out
    assert "tiny_net 32x32 pooled: 7 images" in out
    assert "total: 2 entries" in out and "total: 1 entry" in out
    listed = _json(capsys, "list", "--features", str(tmp_path / "feat"), "--decoded", str(tmp_path / "dec"))
    features, decoded = listed["caches"]
    assert [(e["images"], e["input_size"]) for e in decoded["entries"]] == [(5, [8, 8]), (3, [16, 16])]
    assert {e["path"] for e in decoded["entries"]} == {str(small), str(large)}
    assert decoded["bytes"] == _disk([*_entry_files(small), *_entry_files(large)])
    (entry,) = features["entries"]
    assert (entry["backbone"], entry["images"], entry["path"]) == ("tiny_net", 7, str(store))
    assert entry["bytes"] == features["bytes"] == _disk(_entry_files(store))


def test_list_recognises_a_store_the_feature_cache_filled(tmp_path, images, capsys):
    """The real thing: the tiny backbone through FeatureCache (the store's name is its own hash)."""
    from vision_tl.backbones import create_backbone, resolve_preprocessing
    from vision_tl.features.cache import FeatureCache
    from vision_tl.features.extractor import FeatureExtractor

    paths, shas = images
    fx = FeatureExtractor(create_backbone("test_efficientnet", pretrained=False), "test_efficientnet",
                          resolve_preprocessing("test_efficientnet", 32))
    FeatureCache(tmp_path / "feat").ensure(fx, paths, shas, progress=False)
    (entry,) = _json(capsys, "list", "--features", str(tmp_path / "feat"))["caches"][0]["entries"]
    assert (entry["backbone"], entry["images"], entry["input_size"]) == ("test_efficientnet", 5, [32, 32])


def test_clear_older_than_deletes_only_entries_unused_that_long(tmp_path, images, capsys):
    old, recent = _decoded(tmp_path / "dec", images, 5, 8), _decoded(tmp_path / "dec", images, 3, 16)
    old_store, recent_store = _store(tmp_path / "feat", 4, "old_net"), _store(tmp_path / "feat", 4)
    _age(_entry_files(old), 40)
    _age(_entry_files(old_store), 40)
    _age(_entry_files(recent), 20)
    assert main(["clear", "--older-than", "30", "--yes", "--features", str(tmp_path / "feat"),
                 "--decoded", str(tmp_path / "dec")]) == 0
    out = capsys.readouterr().out
    assert "deleted 1 entry unused for 30 days" in out and "skipped" not in out  # recent: not even candidates
    assert not old.exists() and not old.with_suffix(".json").exists()
    assert recent.exists() and recent.with_suffix(".json").exists()
    assert not (tmp_path / "feat" / "old_net").exists()  # the store, and its emptied backbone folder
    assert recent_store.is_dir() and (recent_store / "meta.json").exists()


def test_an_entry_this_user_may_not_delete_is_a_failure_not_in_use(tmp_path, images, monkeypatch, capsys):
    """With locks (POSIX), a PermissionError is the folder's permissions (a cache another user or root
    made): clear said the entry was in use by a running process and exited 0."""
    entry = _decoded(tmp_path / "dec", images, 5, 8)

    def refused(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    assert main(["clear", "--yes", "--decoded", str(tmp_path / "dec")]) == 1
    out, err = capsys.readouterr()
    assert "in use" not in out and "could not delete" in err and "Permission denied" in err
    assert entry.exists()


def test_reading_an_entry_makes_it_recently_used(tmp_path, images, capsys):
    entry = _decoded(tmp_path / "dec", images, 5, 8)
    _age(_entry_files(entry), 40)
    _decoded(tmp_path / "dec", images, 5, 8)  # a later run reuses it
    assert main(["clear", "--older-than", "30", "--yes", "--decoded", str(tmp_path / "dec")]) == 0
    assert entry.exists()


def test_dry_run_and_a_clear_without_yes_delete_nothing(tmp_path, images, capsys):
    _decoded(tmp_path / "dec", images, 5, 8)
    _store(tmp_path / "feat", 4)
    before = _tree(tmp_path)
    roots = ["--features", str(tmp_path / "feat"), "--decoded", str(tmp_path / "dec")]
    assert main(["clear", *roots]) == 0
    out = capsys.readouterr().out
    assert "would delete 1 entry" in out and "add --yes" in out
    assert main(["clear", "--dry-run", "--yes", *roots]) == 0
    assert "would delete" in capsys.readouterr().out
    assert _tree(tmp_path) == before


def test_files_that_are_not_cache_entries_survive(tmp_path, images, capsys):
    """A root pointed at the wrong folder (``--features ~``) loses only entries of ours."""
    dec, feat = tmp_path / "dec", tmp_path / "feat"
    _decoded(dec, images, 5, 8)
    store = _store(feat, 4)
    foreign = {
        dec / "notes.txt": b"mine",
        dec / "0123456789abcdef01234567.npy": b"not an array",  # our naming, not our content
        dec / "0123456789abcdef01234567.json": b'{"project": "x"}',
        feat / "meta.json": b'{"author": "me"}',
        feat / "photos" / "0123456789abcdef0123" / "meta.json": b'{"backbone": "photos"}',
        store / "readme.txt": b"someone's notes in a store folder",
    }
    wrong_name = {**IDENTITY, "backbone": "tiny_net"}  # a real-looking store under a name not its hash
    foreign[feat / "tiny_net" / "ffffffffffffffffffff" / "meta.json"] = json.dumps(wrong_name).encode()
    for path, data in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert main(["clear", "--yes", "--features", str(feat), "--decoded", str(dec)]) == 0
    assert "its folder stays: it holds files that are not the cache's" in capsys.readouterr().out
    assert all(path.read_bytes() == data for path, data in foreign.items())
    assert [p.name for p in dec.glob("*.npy")] == ["0123456789abcdef01234567.npy"]  # ours went
    assert not (store / "meta.json").exists()
    assert sorted(p.name for p in store.iterdir()) == ["readme.txt"]  # its folder kept for the foreign file


def test_an_entry_in_use_is_skipped_and_deleted_once_released(tmp_path, images, capsys):
    paths, shas = images
    pixels, _ = dc.decoded_images(paths, shas, (8, 8), "bilinear", tmp_path / "dec")  # a run reading it
    entry = Path(pixels.filename)
    store = ShardStore(_store(tmp_path / "feat", 4), IDENTITY)  # a run writing to it
    roots = ["--features", str(tmp_path / "feat"), "--decoded", str(tmp_path / "dec")]
    assert main(["list", *roots]) == 0
    assert capsys.readouterr().out.count("[in use]") == 2
    assert main(["clear", "--yes", *roots]) == 0
    out = capsys.readouterr().out
    assert out.count("in use by a running process") == 2 and "deleted 0 entries" in out
    assert entry.exists() and (store.path / "meta.json").exists()
    assert pixels.sum() == sum(pixels[i].sum() for i in range(len(pixels)))  # still readable
    path = store.path
    del pixels, store
    gc.collect()
    assert main(["clear", "--yes", *roots]) == 0
    assert not entry.exists() and not path.exists()


def test_temporary_files_of_killed_runs_go_and_a_live_writers_stays(tmp_path, images, capsys):
    dec = tmp_path / "dec"
    _decoded(dec, images, 5, 8)
    killed = dec / ".0123456789abcdef01234567.npy.host-999999.abcd1234.tmp"
    killed.write_bytes(b"\0" * 4096)
    _age([killed], 2)
    with locked_temp(dec / "abcdefabcdefabcdefabcdef.npy") as live:
        _age([live], 2)
        assert main(["clear", "--older-than", "30", "--yes", "--decoded", str(dec)]) == 0
        assert live.exists()
    assert not killed.exists()
    assert len(list(dec.glob("*.npy"))) == 1  # the entry, used today


def test_a_fit_sized_build_says_how_big_the_cache_is(tmp_path, images, capsys):
    _decoded(tmp_path / "dec", images, 5, 8)
    out = capsys.readouterr().out
    assert "holds 8.0 KiB in 1 entry" in out and "vision-tl cache clear --help" in out


def test_extract_says_how_big_the_feature_cache_is_when_it_grew(tmp_path, images, capsys):
    argv = ["extract", str(tmp_path / "images"), "--backbone", "test_efficientnet", "--random-init",
            "--image-size", "32", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    assert vision_tl_main([*argv, "--out", str(tmp_path / "a.npz")]) == 0
    first = capsys.readouterr().out
    (listed,) = _json(capsys, "list", "--features", str(tmp_path / "c"))["caches"]
    assert f"feature cache in {tmp_path / 'c'} holds {inventory.format_bytes(listed['bytes'])} in 1 entry" in first
    assert "vision-tl cache clear --help" in first
    assert vision_tl_main([*argv, "--out", str(tmp_path / "b.npz")]) == 0  # every image cached already
    assert "feature cache in" not in capsys.readouterr().out


def test_extract_names_the_entry_it_wrote_with_the_size_cache_list_shows(tmp_path, images, capsys):
    """Two settings over one folder: two entries of the same size. The second extract's line gave
    the total (twice the first's), which read as if the new entry were twice as big as the listing
    showed; it now names its own entry with that entry's size, as the table shows it, and the total."""
    argv = ["extract", str(tmp_path / "images"), "--backbone", "test_efficientnet", "--random-init",
            "--no-progress", "--cache-dir", str(tmp_path / "c")]
    assert vision_tl_main([*argv, "--image-size", "32", "--out", str(tmp_path / "a.npz")]) == 0
    capsys.readouterr()
    assert vision_tl_main([*argv, "--image-size", "48", "--out", str(tmp_path / "b.npz")]) == 0
    second = capsys.readouterr().out
    (listed,) = _json(capsys, "list", "--features", str(tmp_path / "c"))["caches"]
    new = next(e for e in listed["entries"] if e["input_size"] == [48, 48])
    assert len(listed["entries"]) == 2 and new["bytes"] == _disk(_entry_files(Path(new["path"])))
    assert f"holds {inventory.format_bytes(listed['bytes'])} in 2 entries" in second
    assert f"this run's entry {new['name']} takes {inventory.format_bytes(new['bytes'])}" in second
    older = next(e["name"] for e in listed["entries"] if e is not new)
    assert older not in second


@pytest.mark.parametrize("argv, words", [
    (["list", "--features", "{tmp}/missing"], ["{tmp}/missing", "does not exist", "leave --features out"]),
    (["list", "--decoded", "{tmp}/file.txt"], ["{tmp}/file.txt", "is a file, not a folder"]),
    (["clear", "--older-than", "-1"], ["--older-than", "0 or more", "'-1'"]),
    (["clear", "--older-than", "nan"], ["--older-than", "'nan'"]),
    (["list", "--features", ""], ["--features", "empty path"]),
    (["clear", "--kind", "features", "--decoded", "{tmp}"], ["--kind features with --decoded {tmp}", "--kind all"]),
])
def test_bad_input_names_the_path_and_what_would_do(tmp_path, capsys, argv, words):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert vision_tl_main(["cache", *argv]) == 2
    err = capsys.readouterr().err
    assert all(w.replace("{tmp}", str(tmp_path)) in err for w in words), err


def test_missing_default_roots_list_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISION_TL_CACHE", str(tmp_path / "never"))
    monkeypatch.setenv("VISION_TL_DECODED_CACHE", str(tmp_path / "made"))
    assert main(["list"]) == 0
    assert capsys.readouterr().out.count("not there yet, nothing cached") == 2
    assert main(["clear", "--yes"]) == 0
    assert not (tmp_path / "never").exists()


def test_the_command_is_listed_in_vision_tl_help(capsys):
    assert vision_tl_main(["--help"]) == 0
    assert "cache        list the feature and decoded-image caches" in capsys.readouterr().out


class _NfsFlock:
    """``fcntl`` as on an NFS mount: flock becomes a byte-range lock on the server, whose
    exclusive kind needs a descriptor open for writing (EBADF otherwise); shared ones work."""

    def __init__(self) -> None:
        import fcntl

        self._fcntl = fcntl
        self.LOCK_SH, self.LOCK_EX, self.LOCK_NB, self.LOCK_UN = (fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_NB,
                                                                  fcntl.LOCK_UN)

    def flock(self, fd: int, operation: int) -> None:
        if operation & self.LOCK_EX and self._fcntl.fcntl(fd, self._fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(9, "Bad file descriptor")
        self._fcntl.flock(fd, operation)


def test_on_nfs_an_entry_in_use_is_still_skipped(tmp_path, images, capsys, monkeypatch):
    """On NFS the clear's exclusive lock on a read-only descriptor fails with EBADF; that was
    taken for 'no locks here', and the pixel file and the feature store a run was reading were
    deleted under it. A file nobody holds still goes (locked through a writable descriptor)."""
    import vision_tl.utils.files as files

    monkeypatch.setattr(files, "fcntl", _NfsFlock())
    paths, shas = images
    unused = _decoded(tmp_path / "dec", images, 3, 8)
    pixels, _ = dc.decoded_images(paths, shas, (8, 8), "bilinear", tmp_path / "dec")  # a run reading it
    store = ShardStore(_store(tmp_path / "feat", 4), IDENTITY)  # a run writing to it
    roots = ["--features", str(tmp_path / "feat"), "--decoded", str(tmp_path / "dec")]
    assert main(["clear", "--yes", *roots]) == 0
    out = capsys.readouterr().out
    assert out.count("in use by a running process") == 2 and "deleted 1 entry" in out
    assert Path(pixels.filename).exists() and (store.path / "meta.json").exists()
    assert not unused.exists()


def test_an_entry_whose_opening_fails_is_not_held_for_the_process_s_life(tmp_path, images, monkeypatch):
    """A Ctrl-C in a notebook while a reused entry's checksum was read (seconds for a large one),
    or a read error there, left its descriptor open and the entry locked until the kernel restart:
    `cache clear` skipped it as in use, for good. The same after a build that then failed."""
    paths, shas = images
    entry = _decoded(tmp_path / "dec", images, 5, 8)
    root = inventory.cache_root("decoded", tmp_path / "dec")
    dc._VERIFIED.clear()  # (a later run: the checksum is read again)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dc, "file_crc32", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dc.decoded_images(paths, shas, (8, 8), "bilinear", tmp_path / "dec")
    assert [e.in_use for e in inventory.list_entries(root)] == [False]
    monkeypatch.setattr(dc, "_check_unchanged", lambda *args: (_ for _ in ()).throw(ValueError("changed")))
    with pytest.raises(ValueError, match="changed"):
        dc.decoded_images(paths, shas, (6, 6), "bilinear", tmp_path / "dec")  # a new entry, built
    (built,) = set((tmp_path / "dec").glob("*.npy")) - {entry}
    with exclusive_if_unused(built) as free:
        assert free


def test_a_shard_added_after_the_listing_goes_with_its_store(tmp_path):
    """A run may finish a shard between clear's listing and its lock: the store then goes whole,
    not leaving shards without their meta.json, a folder no later listing recognises."""
    store = _store(tmp_path / "feat", rows=3)
    root = inventory.cache_root("features", tmp_path / "feat")
    (entry,) = inventory.list_entries(root)
    late = ShardStore(store, {**IDENTITY})
    late.append([f"{i:064x}" for i in range(100, 104)], np.ones((4, 4), np.float32))
    del late
    gc.collect()
    report = inventory.clear_entries(root, [entry], dry_run=False)
    assert report.deleted == [entry] and not store.exists() and _tree(tmp_path / "feat") == set()


def test_what_an_unfinished_delete_left_is_named_and_cleared(tmp_path, images, capsys):
    """An earlier version's clear, refused an open shard on Windows, left a store without its keys
    files: listed as '0 images' (and its bytes), as if it were an empty store in use. A clear killed
    between renaming an entry and deleting its files leaves names no run reads: they go too."""
    half = _store(tmp_path / "feat", rows=3)
    ShardStore(half, IDENTITY).append([f"{i:064x}" for i in range(3, 5)], np.ones((2, 4), np.float32))
    for keys in half.glob("*.keys.npy"):
        keys.unlink()
    tomb = _store(tmp_path / "feat", rows=2, backbone="other_net")
    tomb = tomb.rename(tomb.with_name(f"{tomb.name}.deleted-0123abcd"))
    pixels = _decoded(tmp_path / "dec", images, 5, 8)
    staged = pixels.with_name(f".{pixels.name}.deleted-0123abcd")
    pixels.rename(staged)
    roots = ["--features", str(tmp_path / "feat"), "--decoded", str(tmp_path / "dec")]
    assert main(["list", *roots]) == 0
    out = capsys.readouterr().out
    assert "0 images (+2 shards without keys: a killed write's or an unfinished delete's)" in out
    assert "store left by a cache clear that could not finish" in out
    assert "file left by a cache clear that could not finish" in out
    _age(_entry_files(half), 40)
    assert main(["clear", "--older-than", "30", "--yes", *roots]) == 0  # leftovers go whatever their age
    assert _tree(tmp_path / "feat") == set()
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == [pixels.with_suffix(".json").name]


def test_a_writers_temporary_file_renamed_during_the_listing_does_not_fail_it(tmp_path, images, monkeypatch, capsys):
    """A running extraction or build renames its temporary files into place within milliseconds:
    one listed by the folder's scan and gone by the time its size was read failed ``cache list``
    (and ``clear``) with FileNotFoundError."""
    store = _store(tmp_path / "feat", rows=3)
    pixels = _decoded(tmp_path / "dec", images, 5, 8)
    own_files = inventory._own_files

    def scanned_before_a_rename(folder, names, temps):  # the scan saw the writer's temporary file
        name = f".{'0' * 16}.keys.npy" if folder == store else f".{pixels.name}"
        gone = folder / f"{name}.pc-1.abcd1234.tmp"
        return [*own_files(folder, names, temps), gone]

    monkeypatch.setattr(inventory, "_own_files", scanned_before_a_rename)
    assert main(["list", "--features", str(tmp_path / "feat"), "--decoded", str(tmp_path / "dec")]) == 0
    out = capsys.readouterr().out
    assert "tiny_net 32x32 pooled: 3 images" in out and "5 images at 8x8" in out
