"""Small shared helpers: which process of a multi-process job this is, and printing once per
job; SIGTERM as an interruption; and keeping the caller's process as it was (warning filters
that decoding threads leave alone, random generators and settings a command puts back,
progress bars that fix no multiprocessing start method); a run's config.yaml and
metrics.json, read. Atomic files are in utils.files, work one DDP process does while the others
wait in utils.distributed."""

import contextlib
import json
import numbers
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path


def env_on(name: str) -> bool:
    """Whether the switch ``name`` (``VISION_TL_DEBUG``, ``VISION_TL_ALLOW_DOWNLOAD``) is set on:
    ``1``, ``true``, ``yes`` or ``on`` in any case (``true`` was ignored without a word)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def launcher_int(name: str, default: int = 0) -> int:
    """An integer a launcher (torchrun, srun, Lightning's DDP) sets in the environment, such as
    ``WORLD_SIZE`` or ``LOCAL_RANK``; ``default`` when unset.

    Raises:
        ValueError: the variable is set but is not a non-negative integer (its name and value in
            the message).
    """
    text = (os.environ.get(name) or "").strip()
    if not text:
        return default
    if not text.isdigit():
        raise ValueError(f"environment variable {name}={text!r} is not a non-negative integer; a launcher such as "
                         f"torchrun sets it: unset it (export -n {name}) to run as one process, or launch with torchrun")
    return int(text)


def read_run_config(run) -> dict:
    """The ``config.yaml`` a command wrote in run directory ``run``, as a dict ({} without one).

    The kit writes it as UTF-8; one in another encoding (written on Windows by an older version,
    in cp1252, or saved so by an editor) is refused rather than guessed at: cp1252 would read
    any bytes, and a misread data root would send report or export to another folder.

    Raises:
        OSError: it cannot be read. ValueError: it is not UTF-8 or not YAML (the message names the file).
    """
    import yaml

    path = os.path.join(run, "config.yaml")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8-sig") as fh:  # (-sig: a BOM an editor put in, dropped)
            config = yaml.safe_load(fh) or {}
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); the kit writes a run's "
                         "config.yaml as UTF-8: open it in an editor and save it with UTF-8 encoding") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a readable config.yaml ({exc})") from exc
    return config if isinstance(config, dict) else {}


class DamagedMetricsError(ValueError):
    """A run's ``metrics.json`` that is there but holds no JSON object (``problem`` says what it holds)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} is {problem}")
        self.path, self.problem = path, problem


METRICS_DAMAGE = ("raise", "set_aside")


def read_run_metrics(path: str | Path, on_damage: str = "raise") -> dict | None:
    """A run's ``metrics.json`` as a dict, to read or to update (under
    :func:`~vision_tl.utils.files.path_lock` of ``path`` for a read-modify-write); {} where
    there is none.

    A damaged one (empty, not UTF-8 or JSON, or JSON other than an object: cut off by a crash
    or a full disk, or a bad hand edit) is handled as ``on_damage`` says:

    - ``"raise"`` (``vision-tl report``, which only adds its section): :class:`DamagedMetricsError`,
      naming the file and what it holds; the caller says what to do and writes nothing.
    - ``"set_aside"`` (fit, at the end of every epoch: a damaged file must not stop training,
      and fit rewrites its own sections from the run's history): the file is kept beside the new
      one as ``metrics.damaged.json`` (``metrics.damaged_2.json`` ... where that name is taken,
      so no earlier copy is replaced) and {} is returned, with a warning naming both files. An
      empty file, which holds nothing to keep, is not copied. Where it cannot be moved,
      None: the caller leaves it as it is.
    """
    if on_damage not in METRICS_DAMAGE:
        raise ValueError(f"unknown on_damage {on_damage!r}; expected one of: {', '.join(METRICS_DAMAGE)}")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"not readable as text ({exc})"
    else:
        problem = _metrics_problem(text)
        if problem is None:
            return json.loads(text)
    if on_damage == "raise":
        raise DamagedMetricsError(path, problem)
    return _set_metrics_aside(path, problem)


def _metrics_problem(text: str) -> str | None:
    """What is wrong with the text of a ``metrics.json`` (None: a JSON object)."""
    if not text.strip():
        return "empty"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"not valid JSON ({exc})"
    return None if isinstance(data, dict) else f"a JSON {type(data).__name__}, not the object vision-tl fit writes"


def _set_metrics_aside(path: Path, problem: str) -> dict | None:
    """Fit's policy for a damaged ``metrics.json`` (see :func:`read_run_metrics`)."""
    if problem == "empty":
        warnings.warn(f"{path} was empty (nothing in it to keep); writing it anew from the run's history",
                      stacklevel=3)
        return {}
    from vision_tl.utils.files import free_sibling

    kept = free_sibling(path, "damaged")  # metrics.damaged.json, else metrics.damaged_2.json ...
    try:
        os.replace(path, kept)
    except OSError as exc:
        warnings.warn(f"{path} is {problem}, and cannot be set aside ({exc}): left as it is, so this run's "
                      "metrics are not written to it; move it away (fit writes it anew at the next epoch's end)",
                      stacklevel=3)
        return None
    warnings.warn(f"{path} is {problem}; writing it anew from the run's history (the damaged file is kept as "
                  f"{kept}: sections other commands added, such as a report's, are only there)", stacklevel=3)
    return {}


def whole_number(value) -> bool:
    """An integer, numpy's too, but not a bool (``True`` is an ``int`` in Python) nor a string:
    what a count, a size or a thread number given from Python may be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_rank() -> int:
    """This process's rank on its machine in a DDP or torchrun job (``LOCAL_RANK``, which both
    set), 0 outside one. Messages every rank would repeat are printed by local rank 0 only."""
    return launcher_int("LOCAL_RANK")


def say(message: str) -> None:
    """Print one line once per job: DDP runs a command in every rank's process, so only local
    rank 0 of node 0 prints. Plain ``print``, flushed, not ``LightningModule.print``: with the
    progress bar on, that hands the line to the bar, which drops it once its bars are closed."""
    if local_rank() == 0 and launcher_int("NODE_RANK") == 0:
        print(message, flush=True)


def printable_stdout() -> None:
    """Write what standard output's encoding cannot hold as ``\\uXXXX`` escapes instead of failing,
    as Python's standard error already does. On Windows, output redirected to a file or a pipe (a
    line PC's scheduled task, a script's log) is in the ANSI code page, cp1252, which has no
    ``傷``: a class or file name printed in a summary raised ``UnicodeEncodeError`` after all the
    work was done. For the command's own process (its console script)."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


class Terminated(KeyboardInterrupt):
    """SIGTERM taken like Ctrl-C: ``finally`` blocks and context managers (temporary files,
    work folders) clean up on the way out."""


@contextlib.contextmanager
def sigterm_as_interrupt(defer: bool = False) -> Iterator[list[int]]:
    """While inside: SIGTERM (``kill``, ``timeout``, a job scheduler) raises :class:`Terminated`
    in the main thread instead of ending the process on the spot. Yields a list that gets the
    signal's number when it came (for a caller whose command caught the interruption itself).
    Outside the main thread, or off POSIX: nothing changes.

    ``defer``: while another handler is installed over this one and calls it on (Lightning's,
    during training: it stops at the next batch boundary and writes its resume point), this
    one leaves the signal to it; before and after, it interrupts."""
    received: list[int] = []
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum, frame) -> None:
        if defer and signal.getsignal(signal.SIGTERM) is not stop:
            return
        received.append(signum)
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def release_process_group() -> None:
    """Destroy the distributed process group a command left (Lightning keeps DDP's to the end)
    while the interpreter is still whole: left to interpreter shutdown, Gloo's worker threads
    are destroyed still running and abort the process ("terminate called without an active
    exception", exit -6; pytorch/pytorch#190489), which turned DDP runs that had finished, or
    stopped cleanly on SIGTERM, into crashes. Imports nothing: a torch-free install has none."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # a peer already gone: the process exits all the same
        print(f"vision_tl: could not close the distributed process group ({exc})", file=sys.stderr)


@contextlib.contextmanager
def no_cudnn_benchmark() -> Iterator[None]:
    """cuDNN's benchmarking off for what runs inside: work that sees a batch shape only a few
    times. An extraction pass has up to four (a split's full and last batch), BatchNorm
    folding's check one: benchmarking each new shape, which ``configs/gpu.yaml`` turns on for
    training, held a fit's feature-cache pass up for 4-8 s per shape on an H100
    (benchmarks/RESULTS.md), longer than the pass itself."""
    import torch

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextlib.contextmanager
def ignoring_warnings(category: type[Warning] = Warning, message: str = "") -> Iterator[None]:
    """Leave out the warnings of ``category`` (text matching ``message`` from its start) raised inside.

    ``warnings.catch_warnings`` swaps the process's warning filters and hooks, and puts back on
    exit what it found on entry: on two threads at once (before Python 3.14) each puts back the
    other's. A decoding thread that entered one before a caller's ``catch_warnings`` (or
    ``pytest.warns``) and left it after put that caller's recorder out of action: its warnings
    vanished. So off the main thread this leaves the filters alone, and such warnings show as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message, category)
        yield


# what Lightning's seed_everything leaves in the environment (inherited by every later process)
_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def callers_global_state() -> Iterator[None]:
    """Put back, on the way out, the process-wide state a command changes: the random generators
    (``random``; numpy's and torch's where the caller has imported them, CUDA's where it has
    started), the seed variables Lightning sets, and cuDNN's flags (``configs/gpu.yaml``
    turns benchmarking on). ``vision_tl.cli.main`` runs a command in a notebook's or a
    script's process: ``test`` or ``predict`` reseeded it with the run's seed, so every draw
    after each call repeated the same numbers."""
    import random

    py_state = random.getstate()
    np_mod, torch_mod = sys.modules.get("numpy"), sys.modules.get("torch")
    np_state = np_mod.random.get_state() if np_mod is not None else None
    torch_state = cuda_states = cudnn = None
    if torch_mod is not None:
        torch_state = torch_mod.random.get_rng_state()
        if torch_mod.cuda.is_initialized():
            cuda_states = torch_mod.cuda.get_rng_state_all()
        cudnn = (torch_mod.backends.cudnn.benchmark, torch_mod.backends.cudnn.deterministic)
    variables = {name: os.environ.get(name) for name in _SEED_VARIABLES}
    try:
        yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np_mod.random.set_state(np_state)
        if torch_state is not None:
            torch_mod.random.set_rng_state(torch_state)
            if cuda_states is not None:
                torch_mod.cuda.set_rng_state_all(cuda_states)
            torch_mod.backends.cudnn.benchmark, torch_mod.backends.cudnn.deterministic = cudnn
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


LOG_INTERVAL = 30.0  # seconds between progress lines where output goes to a log, not a terminal


def interactive(stream) -> bool:
    """Whether ``stream`` shows a progress bar redrawn in place: a terminal, or a Jupyter
    notebook's output (not a terminal, but tqdm draws a widget there)."""
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def lazy_attributes(package: str, modules: dict[str, str], public: list[str]):
    """A package's ``__getattr__`` and ``__dir__`` for names imported from their module
    (``modules``: name -> module) on first use, so that importing the package does not import
    what they need (torch, Lightning); ``dir()`` lists ``public`` as before they were lazy.

    Example (in a package's ``__init__.py``):
        >>> __getattr__, __dir__ = lazy_attributes(__name__, {"export_onnx": "vision_tl.export.pipeline"}, __all__)  # doctest: +SKIP
    """
    import importlib

    def __getattr__(name: str):
        if name in modules:
            return getattr(importlib.import_module(modules[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__


class LineStream:
    """A stream for a tqdm bar whose output goes to a log file or a pipe (a batch job's log,
    ``| tee``, a scheduled task): each redraw becomes a line of its own, trailing padding
    dropped, instead of carriage returns that pile hundreds of half-lines onto one. A redraw
    that repeats the line before it (tqdm's last one, on closing, where only a finished bar's
    rate may differ) is left out. Each line is
    ended as it is written (tqdm writes a redraw in one call): a warning written to the same
    stream between two redraws then starts a line of its own, not the end of the bar's."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._last = ""  # the last line written

    def write(self, text: str) -> int:
        out = []
        for part in text.replace("\n", "\r").split("\r"):
            part = part.rstrip()
            if part.strip() and not self._repeats_last(part):
                self._last = part
                out.append(part + "\n")
        if out:
            self._stream.write("".join(out))
        return len(text)

    def _repeats_last(self, line: str) -> bool:
        """The line before again, or a finished bar's closing redraw after its last line: the same
        count, only its rate changed (tqdm's smoothed rate, then the whole run's average)."""
        if line == self._last:
            return True
        bar = line.rsplit(" [", 1)[0]
        done = re.search(r"\|\s*(\S+)/(\S+)$", bar)
        return bool(done) and done[1] == done[2] and bar == self._last.rsplit(" [", 1)[0]

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):  # encoding, isatty, ... as the stream's
        return getattr(self._stream, name)


def progress_bar(**kwargs):
    """``tqdm.auto.tqdm(**kwargs)``, without fixing the process's multiprocessing start method.

    tqdm's first bar (even a disabled one) creates a lock from multiprocessing's default context,
    which fixes the start method: a notebook's later ``set_start_method("spawn")`` then failed
    with "context has already been set" after ``extract`` or ``report``. tqdm is handed a lock
    from the start method's own context first, which fixes nothing.

    Where the bar's stream (standard error unless ``file`` names one) is not a terminal or a
    notebook, the bar writes a line every :data:`LOG_INTERVAL` seconds (:class:`LineStream`),
    the first after that long: a job shorter than that leaves no progress lines in a log."""
    from tqdm.auto import tqdm

    keep_start_method_free()
    stream = kwargs.get("file") or sys.stderr
    if not kwargs.get("disable") and not interactive(stream):
        # (maxinterval too: tqdm's monitor thread redraws a fast loop's bar once that long has passed
        # since its last line, 10 s by default, which put a line in the log every 10 to 20 s)
        kwargs.update(file=LineStream(stream), mininterval=max(kwargs.get("mininterval", 0), LOG_INTERVAL),
                      maxinterval=max(kwargs.get("maxinterval", 10.0), LOG_INTERVAL),  # (10: tqdm's default)
                      delay=max(kwargs.get("delay", 0), LOG_INTERVAL), dynamic_ncols=False)
    return tqdm(**kwargs)


def keep_start_method_free() -> None:
    """Give tqdm its multiprocessing lock before it makes one from the default context (see
    :func:`progress_bar`; Lightning's progress bar is a tqdm too)."""
    import multiprocessing

    try:
        from tqdm.std import TqdmDefaultWriteLock
    except ImportError:  # (the torch-free deploy install may lack tqdm)
        return
    if "mp_lock" in vars(TqdmDefaultWriteLock) or multiprocessing.get_start_method(allow_none=True) is not None:
        return
    try:
        TqdmDefaultWriteLock.mp_lock = multiprocessing.get_context(multiprocessing.get_all_start_methods()[0]).RLock()
    except (ImportError, OSError):  # (as tqdm does where the platform has no semaphores)
        TqdmDefaultWriteLock.mp_lock = None
