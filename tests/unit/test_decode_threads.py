"""Decoding on threads or loader processes: the same pixels and errors as decoding image by
image, in order, and no thread left writing once the caller stops."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from vision_tl.data import decode_threads
from vision_tl.data import decoded_cache as dc
from vision_tl.data.decode_threads import (
    decode_batches,
    decode_batches_in_processes,
    decode_in_processes,
)
from vision_tl.imaging import ImageLoadError, load_rgb_into

SIZE = (24, 24)


def _images(tmp_path, n: int = 11):
    """JPEGs at the target size (decoded straight into the row), JPEGs and PNGs to resize,
    and a cut-off file at position 5."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (SIZE[0] if i % 2 else 37, SIZE[1], 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i:02d}.{'jpg' if i % 3 else 'png'}")
        Image.fromarray(pixels).save(paths[-1])
    paths[5].write_bytes(paths[5].read_bytes()[:100])
    return paths


def _decode_threads_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vision_tl-decode")]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_batches_hold_each_images_pixels_in_order_and_name_the_bad_one(tmp_path, threads) -> None:
    paths = _images(tmp_path)
    batches = list(decode_batches(paths, SIZE, "bilinear", batch_size=4, threads=threads, ahead=2))
    assert [b.start for b in batches] == [0, 4, 8] and [len(b.pixels) for b in batches] == [4, 4, 3]
    assert {b.start + row for b in batches for row in b.errors} == {5}
    assert "05.jpg" in batches[1].errors[1]
    for b in batches:
        for row, pixels in enumerate(b.pixels.numpy()):
            expected = np.zeros((*SIZE, 3), np.uint8)
            if row not in b.errors:
                load_rgb_into(paths[b.start + row], expected, "bilinear")
            np.testing.assert_array_equal(pixels, expected)  # a bad image's row is black
    assert not _decode_threads_alive()


@pytest.mark.parametrize("processes", [1, 2])
def test_loader_processes_give_the_batches_threads_give(tmp_path, processes) -> None:
    paths = _images(tmp_path)
    threads = list(decode_batches(paths, SIZE, "bilinear", batch_size=4, threads=2))
    procs = list(decode_batches_in_processes(paths, SIZE, "bilinear", batch_size=4, processes=processes))
    assert [(b.start, b.errors) for b in procs] == [(b.start, b.errors) for b in threads]
    assert procs[1].errors[1].startswith(threads[1].errors[1][:20]) and "05.jpg" in procs[1].errors[1]
    for a, b in zip(procs, threads, strict=True):
        np.testing.assert_array_equal(a.pixels.numpy(), b.pixels.numpy())
    assert list(decode_batches_in_processes([], SIZE, "bilinear", 4, 2)) == []
    with pytest.raises(ValueError, match="decoding processes must be 1 or more"):
        decode_batches_in_processes(paths, SIZE, "bilinear", 4, 0)


@pytest.mark.parametrize("processes", [1, 2])
def test_reused_process_buffers_give_every_batch_its_own_pixels_to_a_caller_that_streams(tmp_path, processes):
    # 23 batches of 1-2 images: each process's 4 buffers are reused five times or more
    paths = _images(tmp_path, n=45)
    threads = decode_batches(paths, SIZE, "bilinear", batch_size=2, threads=2)
    procs = decode_batches_in_processes(paths, SIZE, "bilinear", batch_size=2, processes=processes)
    held = []
    for a, b in zip(procs, threads, strict=True):
        held = [*held[-1:], (a, b.pixels.numpy().copy())]  # one batch still held, as extract does
        for rows, expected in held:
            np.testing.assert_array_equal(rows.pixels.numpy(), expected)
        assert a.start == b.start and a.errors.keys() == b.errors.keys()


def test_a_decoding_process_reuses_its_buffers_round_robin(tmp_path, monkeypatch):
    paths = _images(tmp_path, n=12)
    batches = decode_threads._Batches(paths, SIZE, "bilinear", batch_size=2, slots=3)
    monkeypatch.setattr(decode_threads, "get_worker_info", lambda: object())  # as in a loader process
    pointers = [batches[b][1].untyped_storage().data_ptr() for b in range(6)]
    assert pointers[:3] == pointers[3:] and len(set(pointers)) == 3


@pytest.mark.parametrize("cores, workers, expected", [(2, 2, False), (4, 3, False), (8, 7, True), (16, 15, True),
                                                      (16, 1, False), (16, 0, False)])
def test_many_cores_decode_in_processes_few_in_threads(monkeypatch, cores, workers, expected) -> None:
    """Measured on a 16-core GPU machine: 15 threads ~4,500 images/s, 15 processes ~8,000, and
    extract's steady state with threads ~1,750 images/s; threads were faster on 2 cores."""
    monkeypatch.setattr(decode_threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(decode_threads, "_start_method", lambda: "fork")
    assert decode_in_processes(workers) is expected
    monkeypatch.setattr(decode_threads, "_start_method", lambda: "spawn")
    assert decode_in_processes(workers) is False  # a spawned worker imports torch again: threads


def test_rows_land_in_the_buffer_the_caller_gives(tmp_path) -> None:
    paths = _images(tmp_path, 6)
    target = np.full((len(paths), *SIZE, 3), 7, np.uint8)
    import torch

    for b in decode_batches(paths, SIZE, "bilinear", 4, 2, lambda start, n: torch.from_numpy(target[start:start + n])):
        assert np.shares_memory(b.pixels.numpy(), target)
    expected = np.zeros_like(target[0])
    load_rgb_into(paths[3], expected, "bilinear")
    np.testing.assert_array_equal(target[3], expected)


def test_a_caller_that_stops_early_leaves_no_thread_decoding(tmp_path, monkeypatch) -> None:
    paths = _images(tmp_path, 40)
    calls = []
    real = decode_threads.load_rgb_into
    monkeypatch.setattr(decode_threads, "load_rgb_into", lambda *a: calls.append(1) or real(*a))
    batches = decode_batches(paths, SIZE, "bilinear", batch_size=2, threads=2, ahead=2)
    next(batches)
    batches.close()
    assert not _decode_threads_alive()
    done = len(calls)
    assert done < len(paths)  # the batches not asked for were dropped, not decoded
    time.sleep(0.05)
    assert len(calls) == done  # and nothing is decoded after close() returned


def test_a_caller_that_leaves_before_the_first_batch_leaves_no_thread_decoding(tmp_path, monkeypatch) -> None:
    """The threads start on the batches ahead before the first is asked for; a caller that fails
    before it (a GPU warm-up that runs out of memory) closes them, and they stop there."""
    paths = _images(tmp_path, 40)
    calls = []
    real = decode_threads.load_rgb_into

    def slow(*args):
        time.sleep(0.01)
        calls.append(1)
        real(*args)

    monkeypatch.setattr(decode_threads, "load_rgb_into", slow)
    batches = decode_batches(paths, SIZE, "bilinear", batch_size=4, threads=2, ahead=4)
    batches.close()
    assert not _decode_threads_alive()
    done = len(calls)
    time.sleep(0.2)
    assert len(calls) == done < 16  # the chunks queued were dropped, the ones running finished


def test_an_unexpected_error_in_a_thread_reaches_the_caller(tmp_path, monkeypatch) -> None:
    paths = _images(tmp_path, 8)
    real = decode_threads.load_rgb_into

    def load(path, out, interpolation):
        if path == paths[6]:
            raise MemoryError("no memory for 06.jpg")
        real(path, out, interpolation)

    monkeypatch.setattr(decode_threads, "load_rgb_into", load)
    with pytest.raises(MemoryError, match="06.jpg"):
        list(decode_batches(paths, SIZE, "bilinear", batch_size=4, threads=2))
    assert not _decode_threads_alive()


def test_no_images_give_no_batches() -> None:
    assert list(decode_batches([], SIZE, "bilinear", 4, 2)) == []
    assert not _decode_threads_alive()


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        decode_batches([], SIZE, "bilinear", 0, 1)
    with pytest.raises(ValueError, match="decoding threads must be 0 or more"):
        decode_batches([], SIZE, "bilinear", 4, -1)


@pytest.mark.parametrize("cores", [2, 16])
def test_decoded_cache_built_on_threads_or_processes_is_the_one_built_in_one_thread(tmp_path, monkeypatch,
                                                                                    cores) -> None:
    paths = _images(tmp_path)
    from vision_tl.utils.files import file_sha256

    shas = [file_sha256(p) for p in paths]
    one, bad_one = dc.decoded_images(paths, shas, SIZE, "bilinear", tmp_path / "one", threads=0)
    monkeypatch.setattr(decode_threads, "usable_cores", lambda: cores)  # 16: loader processes
    monkeypatch.setattr(decode_threads, "_start_method", lambda: "fork")
    many, bad_many = dc.decoded_images(paths, shas, SIZE, "bilinear", tmp_path / "many", threads=3)
    assert bad_one == bad_many == [5]
    np.testing.assert_array_equal(one, many)
    (meta_one,), (meta_many,) = (tmp_path / "one").glob("*.json"), (tmp_path / "many").glob("*.json")
    assert meta_one.read_text() == meta_many.read_text()  # the same pixel checksum


@pytest.mark.parametrize("cores, processes, expected", [(1, 1, 1), (2, 1, 2), (4, 1, 3), (16, 1, 15), (64, 1, 16),
                                                        (16, 4, 3), (16, 32, 1)])
def test_decoding_threads_follow_the_cores_and_share_them_among_ranks(monkeypatch, cores, processes, expected):
    from vision_tl.data.device import default_decode_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_decode_threads(processes) == expected


def test_image_load_errors_are_the_kits(tmp_path) -> None:
    """What a bad row reports is the ImageLoadError message, which names the file."""
    (bad,) = _images(tmp_path, 6)[5:6]
    with pytest.raises(ImageLoadError) as caught:
        load_rgb_into(bad, np.zeros((*SIZE, 3), np.uint8), "bilinear")
    (batch,) = decode_batches([bad], SIZE, "bilinear", 4, 2)
    assert batch.errors == {0: str(caught.value)}


def test_no_room_in_shared_memory_keeps_decoding_on_threads(monkeypatch) -> None:
    from vision_tl.data import device

    monkeypatch.setattr(decode_threads, "usable_cores", lambda: 16)
    monkeypatch.setattr(decode_threads, "_start_method", lambda: "fork")
    batch = 256 * 224 * 224 * 3
    monkeypatch.setattr(device, "shared_memory_free", lambda: 64 << 20)  # Docker's default
    with pytest.warns(UserWarning, match=r"decoding on 15 threads, not loader processes: /dev/shm has 64 MB free"):
        assert decode_in_processes(15, batch) is False
    monkeypatch.setattr(device, "shared_memory_free", lambda: 4 * 15 * 2 * batch)
    assert decode_in_processes(15, batch) is True


def _decoding_children() -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.is_alive()]


class _Odd(Exception):
    def __init__(self, path, why):  # other arguments than its args: cannot be rebuilt from a pickle
        super().__init__(f"{path}: {why}")


@pytest.mark.parametrize("error, expected", [(MemoryError("06.jpg: cannot allocate"), MemoryError),
                                             (OSError(28, "No space left on device", "06.jpg"), OSError),
                                             (_Odd("06.jpg", "odd"), RuntimeError)])
def test_an_unexpected_error_in_a_process_arrives_as_itself_and_stops_the_processes(tmp_path, monkeypatch, error,
                                                                                      expected) -> None:
    paths = _images(tmp_path, 8)
    real = decode_threads.load_rgb_into

    def load(path, out, interpolation):
        if path == paths[6]:
            raise error
        real(path, out, interpolation)

    monkeypatch.setattr(decode_threads, "load_rgb_into", load)
    with pytest.raises(expected, match="06.jpg") as caught:
        list(decode_batches_in_processes(paths, SIZE, "bilinear", batch_size=2, processes=2))
    assert "DataLoader worker" not in str(caught.value)  # the decoder's message, not a wrapper's
    if expected is OSError:
        assert caught.value.errno == 28
    assert not _decoding_children()  # gone now, not at the next garbage collection


def test_warnings_of_decoding_processes_reach_the_caller_once(tmp_path, monkeypatch) -> None:
    """A 16-bit image using few levels is reported once per run, whichever process decoded it."""
    from vision_tl import imaging

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 4000, (24, 24)).astype(np.uint16)).save(paths[-1])
    monkeypatch.setattr(imaging, "_warned_dim", False)
    with pytest.warns(imaging.DimImageWarning, match="16-bit image") as caught:
        batches = list(decode_batches_in_processes(paths, SIZE, "bilinear", batch_size=2, processes=3))
    assert len(batches) == 3 and len([w for w in caught if w.category is imaging.DimImageWarning]) == 1


def test_processes_leave_the_start_method_free_and_are_not_used_inside_a_daemon(tmp_path, monkeypatch) -> None:
    import multiprocessing

    monkeypatch.setattr(multiprocessing.context._default_context, "_actual_context", None)
    list(decode_batches_in_processes(_images(tmp_path, 6), SIZE, "bilinear", 2, 2))
    assert multiprocessing.get_start_method(allow_none=True) is None  # a later set_start_method() still works
    monkeypatch.setattr(decode_threads, "usable_cores", lambda: 16)
    monkeypatch.setattr(decode_threads, "_start_method", lambda: "fork")
    assert decode_in_processes(15)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    assert not decode_in_processes(15)  # a Pool's or Celery's worker may not have children


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_decoding_processes_leave_no_buffer_in_shared_memory_under_the_file_system_strategy(tmp_path):
    import gc

    import torch.multiprocessing as tmp

    def ours() -> set[str]:  # torch's files of this test's processes (file_system: torch_<pid>_...)
        return {f for f in os.listdir("/dev/shm") if f.startswith("torch_")} - before

    paths = _images(tmp_path, n=24)
    before = {f for f in os.listdir("/dev/shm") if f.startswith("torch_")}
    strategy = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    try:
        for _ in range(2):
            for rows in decode_batches_in_processes(paths, SIZE, "bilinear", batch_size=4, processes=2):
                del rows
        gc.collect()
        deadline = time.time() + 5
        while ours() and time.time() < deadline:
            time.sleep(0.1)
        assert not ours()
    finally:
        tmp.set_sharing_strategy(strategy)
