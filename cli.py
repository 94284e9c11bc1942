"""What the programs (train.py, sample.py, eval.py, convert.py) share at the command line: argparse `type=`
checks for numbers, and `run`, which turns the project's own errors into one line and exit code 2.

Bad input is stopped at the edge (STYLE.md, point 15): a flag is checked when it is parsed, a file when the disk
layer reads it (checkpoint.CheckpointError names the file and the key), a data folder when data.py lists it.
Past the edge the code trusts its inputs. A real bug is no user's mistake: it keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from checkpoint import CheckpointError
from data import DataError


class UsageError(ValueError):
    """A user's mistake found past argument parsing (a flag that contradicts another, a missing input)."""


def _number(kind, text: str, test, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not test(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a positive integer (1, 2, ...)")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def finite_float(text: str) -> float:
    return _number(float, text, math.isfinite, "a finite number (not nan or inf)")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def probability(text: str) -> float:
    return _number(float, text, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]")


def torch_device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:1, mps; "auto" is cuda when there is one, else cpu."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    have = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if have.get(device.type, 1) <= (device.index or 0):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {have.get(device.type, 0)} {device.type} "
                                         "device(s); use --device cpu")
    return text


def output_folder(text: str) -> str:
    """A folder to write, created if new: refused at once (not after a long run) when it, or a folder above it, is a
    file."""
    path = Path(text)
    if blocked := next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None):
        raise argparse.ArgumentTypeError(f"{text!r}: {blocked} exists and is not a folder; give a new or an existing "
                                         "folder")
    return text


def comma_list(item, as_text: bool = False):
    """A `type=` for comma-separated values, each checked by `item`: comma_list(non_negative_float)("0,1,2");
    as_text=True returns the text itself once checked (so it is saved as given)."""
    def parse(text: str):
        values = [item(x) for x in text.split(",")]
        return text if as_text else values
    return parse


# The errors that mean "the input was wrong", not "the code is wrong": files the user named that are missing or
# broken, and values that contradict each other. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UsageError, CheckpointError, DataError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               FileExistsError)


def run(main, argv=None, program: str | None = None):
    """Call main(argv); a user error becomes one line on stderr, `program: message`, and exit code 2."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        name = program or sys.argv[0].rsplit("/", 1)[-1]
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
