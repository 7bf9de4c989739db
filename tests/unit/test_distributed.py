"""Which errors mean "another process of this DDP job stopped" (one line, no traceback)."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist

from vision_tl.utils.distributed import peer_stopped


def test_without_a_process_group_nothing_is_a_lost_peer() -> None:
    assert not dist.is_initialized()
    assert peer_stopped(RuntimeError("Connection closed by peer [127.0.0.1]:2345")) is None


@pytest.fixture
def one_process_group():
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_command_line_closes_a_process_group_left_open_before_the_process_exits(one_process_group, monkeypatch):
    from vision_tl import cli

    monkeypatch.setattr(cli, "_main", lambda: 0)
    monkeypatch.setattr(cli.sys, "argv", ["vision-tl", "fit"])
    assert dist.is_initialized()
    assert cli.console_main() == 0
    assert not dist.is_initialized()  # interpreter shutdown would otherwise destroy Gloo's threads running


def test_a_lost_connection_in_a_collective_is_a_stopped_peer(one_process_group) -> None:
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:23939. This is typically caused by a remote worker crashing.")
    assert peer_stopped(gloo) == ("another process of this 1-process run stopped (its error is printed above), "
                                  "so process 0 stops too")
    assert peer_stopped(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
    assert peer_stopped(ValueError("Connection closed by peer")) is None  # a user error keeps its own line


def test_a_mangled_launcher_variable_is_named(monkeypatch) -> None:
    """A stray WORLD_SIZE=two in a user's shell stops extract with the variable's name, not int()'s
    bare "invalid literal"; unset or blank means one process."""
    from vision_tl.features.distributed import current_ranks
    from vision_tl.utils import launcher_int

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert launcher_int("LOCAL_WORLD_SIZE", 1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", " ")
    assert launcher_int("LOCAL_WORLD_SIZE", 1) == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a non-negative integer.*torchrun"):
        current_ranks()


def test_the_first_process_is_found_under_torchrun_srun_and_lightning(monkeypatch):
    """Only the first process takes a run's lock: srun numbers its tasks in SLURM_PROCID."""
    from vision_tl.tasks.lightning_cli import first_process

    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert first_process()
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not first_process()
    monkeypatch.setenv("RANK", "0")  # torchrun inside an allocation: its own numbering
    assert first_process()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started
    assert not first_process()
