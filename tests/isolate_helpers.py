"""Functions that tests/test_isolate.py runs in an isolated child process: they must live in an importable module
(pytest puts tests/ on sys.path, and a spawned child gets the parent's sys.path)."""

import ctypes
import os
import time
from pathlib import Path

from curation.video_stage import _process_in_child


def add(a: int, b: int) -> int:
    return a + b


def child_pid() -> int:
    return os.getpid()


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0 in C: a real SIGSEGV, as a decoder bug would raise


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def raise_value_error(message: str) -> None:
    raise ValueError(message)


class NeedsTwoArguments(Exception):
    """Pickles but cannot be unpickled: pickle calls __init__ with `args`, which holds only the message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def raise_unpicklable(message: str) -> None:
    raise NeedsTwoArguments(7, message)


def exit_with(code: int) -> None:
    os._exit(code)


def process_crashing_on_marked_files(config, video_id: str, uri: str, size: int) -> dict:
    """VideoStage's child entry, except that a file named crash-* segfaults the decoder and hang-* never ends."""
    name = Path(uri).name
    if name.startswith("crash-"):
        segfault()
    if name.startswith("hang-"):
        sleep(3600)
    return _process_in_child(config, video_id, uri, size)


def unpicklable_result():
    return lambda: None
