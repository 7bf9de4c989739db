"""Turning user errors into one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from vision_tl.utils import env_on


@contextlib.contextmanager
def user_errors(extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Print ``error: <message>`` and exit with status 2 for errors caused by user input.

    Args:
        extra: more exception types that mean bad input in the caller's context.

    Set ``VISION_TL_DEBUG=1`` to see the full traceback.
    """
    from vision_tl.backbones import BackboneWeightsError

    # ValueError covers DatasetError, ImageLoadError, CheckpointError and bad arguments;
    # OSError covers missing, unreadable or existing files.
    expected: tuple[type[BaseException], ...] = (ValueError, OSError, BackboneWeightsError, *extra)
    try:
        yield
    except expected as exc:
        if env_on("VISION_TL_DEBUG"):
            raise
        _say(f"error: {exc}")
        raise SystemExit(2) from exc
    except RuntimeError as exc:  # torch's words for an input smaller than a layer's window
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if env_on("VISION_TL_DEBUG") or not any(p in first for p in _TOO_SMALL):
            raise
        _say(f"error: the images are too small for this backbone's layers ({first}); give a larger "
             "--model.image_size (or --image-size): most CNNs need 32 px or more")
        raise SystemExit(2) from exc


def _say(line: str) -> None:
    """``line`` and its newline in one write (print makes two): the processes of a DDP run that all
    stop on the same error then print a line each, not one run into the next."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


_TOO_SMALL = ("Kernel size can't be greater than actual input size", "Output size is too small",
              "Calculated padded input size per channel")
