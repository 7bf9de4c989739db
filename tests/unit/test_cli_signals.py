"""SIGTERM (kill, timeout, a scheduler) stops the commands outside Lightning the way Ctrl-C
does: their cleanup runs, the exit status says what happened, nothing prints a traceback."""

from __future__ import annotations

import os
import signal
import time

import pytest

from vision_tl import cli
from vision_tl.utils import Terminated, sigterm_as_interrupt

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # interrupted by the handler long before this ends


def test_sigterm_raises_in_the_main_thread_so_cleanup_runs_and_the_old_handler_returns() -> None:
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(Terminated):
        with sigterm_as_interrupt() as received:
            try:
                _sigterm_self()
            finally:
                cleaned.append(True)
    assert cleaned == [True] and received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("command, caught, status", [
    ("export", False, 143),  # nobody caught it: the console script says so and exits 143
    ("export", True, 143),  # the command caught it and reported its own 130: still a SIGTERM
    ("probe", False, 143),
])
def test_console_script_exits_143_on_sigterm_without_a_traceback(command, caught, status, monkeypatch, capsys):
    def command_main():
        try:
            _sigterm_self()
        except KeyboardInterrupt:
            if not caught:
                raise
            return 130
        return 0

    monkeypatch.setattr(cli, "_main", command_main)
    monkeypatch.setattr("sys.argv", ["vision-tl", command])
    assert cli.console_main() == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if not caught:
        assert f"vision-tl {command}: stopped (SIGTERM)" in err


def test_ctrl_c_outside_any_command_handler_is_one_line(monkeypatch, capsys) -> None:
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    monkeypatch.setattr("sys.argv", ["vision-tl", "extract"])
    assert cli.console_main() == 130
    assert capsys.readouterr().err.strip() == "vision-tl extract: interrupted"


def test_a_lightning_fit_inside_a_command_that_exits_1_on_sigterm_still_exits_143(monkeypatch, capsys):
    """demo runs a fit: Lightning takes the interruption and calls sys.exit(1)."""
    def demo_main():
        try:
            _sigterm_self()
        except KeyboardInterrupt:
            raise SystemExit(1) from None

    monkeypatch.setattr(cli, "_main", demo_main)
    monkeypatch.setattr("sys.argv", ["vision-tl", "demo"])
    assert cli.console_main() == 143
    assert "vision-tl demo: stopped (SIGTERM)" in capsys.readouterr().err


def test_lightning_commands_are_interrupted_until_lightning_handles_sigterm_itself(monkeypatch, capsys):
    """fit's set-up (decoding and hashing a folder) runs before Lightning installs its SIGTERM
    handler: a SIGTERM there interrupts like Ctrl-C (temporary files removed, exit 143). Once
    Lightning's handler is installed and calls the previous one on, the signal is left to it
    (it stops at the next batch boundary)."""
    def fit_main():
        calls = []

        def lightning_handler(signum, frame):  # what Lightning's composed handler does
            calls.append(signum)
            previous(signum, frame)

        previous = signal.signal(signal.SIGTERM, lightning_handler)
        try:
            _sigterm_self()  # during training: no exception here
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert calls == [signal.SIGTERM]
        try:
            _sigterm_self()  # during set-up
        except KeyboardInterrupt:
            raise SystemExit(1) from None  # Lightning's graceful shutdown
        return 0

    monkeypatch.setattr(cli, "_main", fit_main)
    monkeypatch.setattr("sys.argv", ["vision-tl", "fit"])
    assert cli.console_main() == 143
    assert "vision-tl fit: stopped (SIGTERM)" in capsys.readouterr().err


@pytest.mark.parametrize("missing, one_line", [("torch", True), ("lightning.pytorch", True), ("not_a_kit_module", False)])
def test_a_command_that_meets_a_missing_full_kit_module_says_which_install_it_needs(missing, one_line, monkeypatch,
                                                                                   capsys):
    """The kit installed with --no-deps beside the predictor's needs: report, extract, explain...
    import torch only once they run, which gave a traceback instead of the one-line answer."""
    from vision_tl.reports import cli as reports_cli

    def report_main(argv):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(reports_cli, "report_main", report_main)
    if not one_line:  # not the kit's: the command's own error, as before
        with pytest.raises(ModuleNotFoundError):
            cli.main(["report", "runs/x"])
        return
    assert cli.main(["report", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert "vision-tl report needs the full kit" in err and f"no module {missing!r}" in err
    # the kit is not on PyPI: a `pip install vision-tl` there would fetch someone else's package
    assert "pip install REPO" in err and "not on PyPI" in err and "pip install vision-tl" not in err


def test_a_resume_from_inside_an_epoch_says_it_will_not_match_exactly(capsys):
    from pathlib import Path

    from vision_tl.tasks.lightning_cli import _note_mid_epoch

    def state(processed: int, last: bool) -> dict:
        batches = {"current": {"processed": processed}, "is_last_batch": last}
        return {"epoch": 1, "loops": {"fit_loop": {"epoch_loop.batch_progress": batches}}}
    _note_mid_epoch(state(24, True), Path("last.ckpt"))  # the end of an epoch: exact
    _note_mid_epoch(state(3, False), Path("step.ckpt"))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "last.ckpt" not in text and "step.ckpt was written 3 batches into epoch 1" in text


def test_a_mistyped_command_gets_a_suggestion_and_help_cmd_gives_that_commands_help(capsys):
    from vision_tl.cli import main

    assert main(["fitt"]) == 2
    assert "unknown command 'fitt'; did you mean 'fit'?" in capsys.readouterr().err
    info = main(["help", "extract"])
    assert info == 0 and "usage: vision-tl extract" in capsys.readouterr().out


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--data.batch_size", "abc", "error: --data.batch_size: Expected a <class 'int'>. Got value: abc"),
    ("--mode", "frozen", "error: --mode is not an option; did you mean --model.mode?"),
    ("--ckpt-path", "last", "error: --ckpt-path is not an option; options are written with underscores: --ckpt_path"),
    ("--trainer.max-epochs", "3",
     "error: --trainer.max-epochs is not an option; options are written with underscores: --trainer.max_epochs"),
])
def test_a_bad_value_or_an_ambiguous_flag_is_two_lines_not_the_usage_text(flag, value, expected, capsys):
    from pathlib import Path

    from vision_tl.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "frozen.yaml"
    info = main(["fit", "--config", str(config), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert info == 2 and err[0] == expected and len(err) == 2


def test_the_help_hint_names_the_command_as_typed_under_python_m(monkeypatch, capsys):
    """`python -m vision_tl.cli` (as under torchrun) said "all options: cli.py fit --help", not a command."""
    from pathlib import Path

    from vision_tl.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "frozen.yaml"
    monkeypatch.setattr("sys.argv", [str(Path(cli.__file__)), "fit"])
    assert main(["fit", "--config", str(config), "--model.mdoe", "frozen"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("all options: python -m vision_tl.cli fit --help")
    monkeypatch.setattr("sys.argv", ["/usr/bin/vision-tl", "fit"])
    assert main(["fit", "--config", str(config), "--model.mdoe", "frozen"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("all options: vision-tl fit --help")


def test_print_config_names_the_file_holding_an_unknown_key(tmp_path, capsys):
    from pathlib import Path

    from vision_tl.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "frozen.yaml"
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  mdoe: frozen\n")
    info = main(["fit", "--config", str(config), "--config", str(typo), "--print_config"])
    err = capsys.readouterr().err
    assert info == 2
    assert f"unknown option or config key 'model.mdoe' in {typo}; did you mean 'model.mode'" in err
    assert err.rstrip().endswith(" fit --help")  # the subcommand's options, not the root's


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_a_missing_data_root_names_the_option_to_give(command, capsys):
    """Without --data.root (no --config), the error names the option as it is typed, not the
    parser's key `predict.data.root` under the usage of every command."""
    from vision_tl.cli import main

    info = main([command])
    err = capsys.readouterr().err.strip().splitlines()
    assert info == 2 and len(err) == 2
    assert err[0].startswith("error: --data.root is required") and "RUN/config.yaml" in err[0]
    assert err[1].endswith(f" {command} --help")


def test_a_recipe_without_data_root_says_its_default_is_the_demo_set(tmp_path, monkeypatch, capsys):
    """`fit --config configs/frozen.yaml` without --data.root reads the recipe's data/demo: where
    no demo ran, the error says where that folder came from and what to pass, not only that a
    folder the user never named does not exist."""
    from pathlib import Path

    from vision_tl.cli import main

    configs = Path(__file__).parents[2] / "configs"
    monkeypatch.chdir(tmp_path)
    info = main(["fit", "--config", str(configs / "frozen.yaml"), "--trainer.logger.init_args.save_dir", "runs"])
    err = capsys.readouterr().err
    assert info == 2
    assert "data root data/demo does not exist" in err and "recipes' default" in err and "--data.root DIR" in err
    assert not (tmp_path / "runs").exists()


def test_a_mistyped_key_is_pointed_at_the_option_a_linked_key_is_set_from(capsys):
    """data.image_size follows model.image_size (and data.backbone model.backbone): a typo near
    one is pointed at the option to give, and the keys listed as valid are those that can be given."""
    from pathlib import Path

    from vision_tl.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "frozen.yaml"
    info = main(["fit", "--config", str(config), "--data.image_sz", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info == 2
    assert err[0].startswith("error: unknown option or config key 'data.image_sz'; did you mean 'model.image_size'")
    assert "'data.image_size'" not in err[0]
    valid = err[1].split(": ", 1)[1].split(", ")
    assert "root" in valid and "image_size" not in valid and "backbone" not in valid


@pytest.mark.parametrize("extra", [[], ["--print_config"]])
def test_a_dashed_key_in_a_config_file_is_told_its_underscore_spelling(tmp_path, capsys, extra):
    from pathlib import Path

    from vision_tl.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "frozen.yaml"
    dashed = tmp_path / "dashed.yaml"
    dashed.write_text("trainer:\n  max-epochs: 3\n")
    info = main(["fit", "--config", str(config), "--config", str(dashed), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert info == 2 and len(err) == 2
    assert err[0] == (f"error: key 'trainer.max-epochs' in {dashed} is not an option; keys are written with "
                      "underscores: 'trainer.max_epochs'")


def test_fit_help_describes_the_checkpoint_options_as_the_kit_reads_them(capsys):
    from vision_tl.cli import main

    info = main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert info == 0
    assert "--checkpoint.mode MODE auto (default): min for a loss, max for an accuracy" in text
    assert "--checkpoint.save_top_k SAVE_TOP_K only 1: the kit keeps one best.ckpt" in text
    # fixed by the kit (fit refuses other values): Lightning's own text said the opposite
    assert "--checkpoint.dirpath DIRPATH fixed: RUN/checkpoints" in text
    assert "--checkpoint.filename FILENAME fixed: best" in text
    assert "val/balanced_acc, val/acc, val/f1_macro, val/loss" in text
    assert "do not save anything to disk" not in text and "'{epoch}-{step}'" not in text
    assert ":data:`BALANCE_RATIO`" not in text and "at least 4 times" in text
