"""Tests for the synthetic inspection dataset generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_tl.data.synthetic import (
    CLASSES,
    DEMO_COUNTS,
    MIN_SIZE,
    make_inspection_dataset,
    render_sample,
    render_sample_with_mask,
)

DEFECTS = [kind for kind in CLASSES if kind != "good"]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _pair(kind: str, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A ``good`` image and a ``kind`` image rendered from identically seeded generators."""
    good = render_sample("good", np.random.default_rng(seed), size)
    other = render_sample(kind, np.random.default_rng(seed), size)
    return good.astype(np.int16), other.astype(np.int16)


def test_public_constants() -> None:
    assert CLASSES == ("good", "scratch", "spot", "crack")
    assert set(DEMO_COUNTS) == set(CLASSES)
    assert DEMO_COUNTS["good"] > max(DEMO_COUNTS[k] for k in DEFECTS)


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("size", [MIN_SIZE, 128])
def test_render_sample_shape_dtype_and_gray(kind: str, size: int) -> None:
    image = render_sample(kind, np.random.default_rng(0), size)
    assert image.shape == (size, size, 3)
    assert image.dtype == np.uint8
    means = image.reshape(-1, 3).mean(axis=0)
    assert 40 < means.mean() < 215
    assert np.ptp(means) < 20  # gray-looking metal, not a colour image


def test_render_sample_default_size() -> None:
    assert render_sample("good", np.random.default_rng(0)).shape == (128, 128, 3)


@pytest.mark.parametrize("kind", CLASSES)
def test_render_sample_is_deterministic(kind: str) -> None:
    a = render_sample(kind, np.random.default_rng(42), 48)
    b = render_sample(kind, np.random.default_rng(42), 48)
    c = render_sample(kind, np.random.default_rng(43), 48)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_sample_unknown_kind() -> None:
    with pytest.raises(ValueError, match="dent") as info:
        render_sample("dent", np.random.default_rng(0))
    assert all(kind in str(info.value) for kind in CLASSES)


def test_render_sample_rejects_tiny_size() -> None:
    with pytest.raises(ValueError, match="size"):
        render_sample("good", np.random.default_rng(0), MIN_SIZE - 1)


# The background is drawn before the defect, so the same seed gives the same surface
# for every kind: the difference to ``good`` is exactly the defect. These properties
# hold by construction (defect amplitudes are >= 35 gray levels, cracks only darken,
# a scratch set is all bright or all dark), not by a statistical margin.
@pytest.mark.parametrize("kind", DEFECTS)
@pytest.mark.parametrize("seed", range(6))
def test_defect_is_visible_and_local(kind: str, seed: int) -> None:
    good, defect = _pair(kind, seed)
    delta = defect - good
    changed = np.abs(delta).max(axis=2)
    assert changed.max() >= 25
    assert 0 < (changed > 0).mean() < 0.4
    if kind == "crack":
        assert (delta <= 0).all()
    if kind == "scratch":
        assert (delta <= 0).all() or (delta >= 0).all()


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("seed", range(4))
def test_masked_render_gives_the_same_image_and_marks_the_defect(kind: str, seed: int) -> None:
    image, mask = render_sample_with_mask(kind, np.random.default_rng(seed), 64)
    # the very image render_sample (and so make_inspection_dataset) gives for this seed
    np.testing.assert_array_equal(image, render_sample(kind, np.random.default_rng(seed), 64))
    assert mask.shape == (64, 64) and mask.dtype == bool
    if kind == "good":
        assert not mask.any()
        return
    good, defect = _pair(kind, seed)
    changed = np.abs(defect - good).max(axis=2)
    assert 0 < mask.mean() < 0.2
    # the mask holds the strongest change and every pixel it marks is visibly changed
    assert mask[np.unravel_index(changed.argmax(), changed.shape)]
    assert changed[mask].min() >= 5


def test_same_seed_good_images_match() -> None:
    good, again = _pair("good", 3)
    np.testing.assert_array_equal(good, again)


def test_dataset_layout_and_imbalanced_counts(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    counts = {"good": 4, "scratch": 2, "spot": 1, "crack": 0}
    assert make_inspection_dataset(root, counts, size=MIN_SIZE) == counts
    assert sorted(_files(root)) == [
        "good/good_0000.png",
        "good/good_0001.png",
        "good/good_0002.png",
        "good/good_0003.png",
        "scratch/scratch_0000.png",
        "scratch/scratch_0001.png",
        "spot/spot_0000.png",
    ]  # no "crack" folder, no temporary files left behind
    with Image.open(root / "spot" / "spot_0000.png") as image:
        assert image.mode == "RGB"
        assert image.size == (MIN_SIZE, MIN_SIZE)


def test_dataset_int_counts_and_subset(tmp_path: Path) -> None:
    assert make_inspection_dataset(tmp_path / "a", 2, size=MIN_SIZE) == dict.fromkeys(CLASSES, 2)
    assert len(_files(tmp_path / "a")) == 2 * len(CLASSES)
    result = make_inspection_dataset(tmp_path / "b", {"crack": 1, "good": 2}, size=MIN_SIZE)
    assert result == {"good": 2, "crack": 1}
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["crack", "good"]


def test_dataset_is_byte_identical_per_seed(tmp_path: Path) -> None:
    make_inspection_dataset(tmp_path / "a", 2, size=MIN_SIZE, seed=7)
    make_inspection_dataset(tmp_path / "b", 2, size=MIN_SIZE, seed=7)
    make_inspection_dataset(tmp_path / "c", 2, size=MIN_SIZE, seed=8)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)


def test_more_images_keep_earlier_ones(tmp_path: Path) -> None:
    make_inspection_dataset(tmp_path / "small", {"good": 1, "spot": 2}, size=MIN_SIZE)
    make_inspection_dataset(tmp_path / "large", {"good": 3, "spot": 3}, size=MIN_SIZE)
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    assert all(large[name] == data for name, data in small.items())
    # Images within a class, and across classes at the same index, all differ.
    assert len(set(large.values())) == len(large)


def test_dataset_refuses_non_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    make_inspection_dataset(root, 1, size=MIN_SIZE)  # an existing empty folder is fine
    with pytest.raises(FileExistsError, match="ds"):
        make_inspection_dataset(root, 1, size=MIN_SIZE)


def test_dataset_overwrite_removes_only_stale_generated_files(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_inspection_dataset(root, 3, size=MIN_SIZE)
    (root / "good" / "notes.txt").write_text("keep me")
    (root / "README").write_text("keep me too")
    make_inspection_dataset(root, {"good": 1, "spot": 2}, size=MIN_SIZE, overwrite=True)
    assert sorted(_files(root)) == [
        "README",
        "good/good_0000.png",
        "good/notes.txt",
        "spot/spot_0000.png",
        "spot/spot_0001.png",
    ]


def test_dataset_root_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file.png"
    path.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        make_inspection_dataset(path, 1, size=MIN_SIZE, overwrite=True)


def test_dataset_unknown_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dent") as info:
        make_inspection_dataset(tmp_path / "ds", {"good": 1, "dent": 1}, size=MIN_SIZE)
    assert all(kind in str(info.value) for kind in CLASSES)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"counts": -1}, "non-negative"),
        ({"counts": {"good": 1.5}}, "non-negative int"),
        ({"counts": {"good": 0}}, "nothing to generate"),
        ({"counts": 1, "size": 8}, "size"),
        ({"counts": 1, "seed": -1}, "seed"),
    ],
)
def test_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_inspection_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_the_demo_never_replaces_images_earlier_demo_runs_trained_on(tmp_path):
    from vision_tl.demo import _prepare_data

    root = tmp_path / "demo"
    _prepare_data(root, 32, 0)
    before = sorted(p.read_bytes() for p in root.rglob("*.png"))
    _prepare_data(root, 32, 0)  # the same recipe: reused
    with pytest.raises(FileExistsError, match=r"size 32 with seed 0, which earlier demo runs trained on.*demo-48px-seed0"):
        _prepare_data(root, 48, 0)
    assert sorted(p.read_bytes() for p in root.rglob("*.png")) == before
    (root / ".vision_tl_demo.json").write_text("{")
    with pytest.raises(ValueError, match=r"\.vision_tl_demo\.json .* is damaged"):
        _prepare_data(root, 32, 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        _prepare_data(tmp_path / "file", 32, 0)


def test_a_demo_stopped_while_writing_its_images_is_finished_by_the_next(tmp_path, monkeypatch, capsys):
    """Ctrl-C part-way through the images left a folder the next demo refused for good ("not made
    by the demo"), so `make demo` failed until the folder was deleted by hand."""
    import vision_tl.data.synthetic as synthetic
    from vision_tl.demo import _prepare_data

    real = synthetic.make_inspection_dataset

    def interrupted(root, *args, **kwargs):
        (root / "good").mkdir(parents=True)
        (root / "good" / "good_0000.png").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "make_inspection_dataset", interrupted)
    root = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt):
        _prepare_data(root, 32, 0)
    monkeypatch.setattr(synthetic, "make_inspection_dataset", real)
    _prepare_data(root, 32, 0)
    assert "stopped while writing" in capsys.readouterr().out
    _prepare_data(root, 32, 0)  # and is then reused
    assert "reusing" in capsys.readouterr().out
    assert all(p.stat().st_size > 100 for p in root.rglob("*.png"))


def test_the_demo_puts_another_size_or_seed_in_a_folder_of_its_own():
    from vision_tl.demo import _parser, default_data

    assert default_data(128, 0).as_posix() == "data/demo"  # the README's `vision-tl demo`
    assert default_data(96, 0).as_posix() == "data/demo-96px-seed0"  # demo --help's "quicker" example
    assert default_data(128, 3).as_posix() == "data/demo-128px-seed3"
    assert _parser().parse_args(["--size", "96"]).data is None  # (resolved by run)
