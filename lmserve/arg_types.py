"""The types of `lmserve serve`'s options (argparse's `type`): text -> a size in bytes, a count or
a duration, or argparse's error saying what was wrong. The --config file's sizes are read with
parse_size too.
"""

from __future__ import annotations

import argparse
import re

from lmserve.fleet.catalogue import duration_seconds

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '2G', '1073741824' -> bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").upper() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 512MiB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def positive_size(text: str) -> int:
    size = parse_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least one byte, not {text!r}")
    return size


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def non_negative_int(text: str) -> int:
    if integer(text) < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text!r}")
    return int(text)


def non_negative_float(text: str) -> float:
    """--max-step-ms: a number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, not {text!r}")
    return value


def thread_count(text: str) -> int | None:
    """--threads (-t): a positive count, or -1 (llama-server's default) for torch's own (None)."""
    return None if text.strip() == "-1" else positive_int(text)


def positive_duration(text: str) -> float:
    """--read-timeout and --write-timeout: seconds or '30s', '2m'; more than none."""
    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive duration, not {text!r}")
    return seconds


def parse_duration(text: str) -> float | None:
    """--default-ttl and --load-timeout: seconds or '30s', '5m', '1h'; a negative one (-1) is never (None)."""
    try:
        return duration_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def shutdown_duration(text: str) -> float:
    """--shutdown-timeout: a duration of 0 or more (the point of it is a bound)."""
    seconds = parse_duration(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text!r}")
    return seconds
