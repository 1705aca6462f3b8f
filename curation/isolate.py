"""Run a function in a sandboxed child process, so a native crash or a hang in it cannot take the caller down.

Decoders (FFmpeg through PyAV, decord) are native code fed untrusted files: a segfault there kills the whole Ray
worker and a decoder stuck in a loop blocks it forever. `IsolatedWorker` runs each call in a long-lived child
process, started lazily with the "spawn" method (never fork: Ray workers are multi-threaded, and a forked child
of a multi-threaded process can deadlock on a lock some other thread held) and reused, so its start-up cost is paid
once per worker, not once per video. A call whose child dies raises `ChildCrashed`; a call past its time limit has
its child killed and raises `ChildTimedOut`. Either way the next call starts a fresh child. A call may move its own
time limit once it knows how much work it has (`set_time_limit`, capped by the caller).

Each child gets its own scratch directory as its temporary directory (`tempfile`, TMPDIR), removed whenever the child
is stopped: a child killed mid-call cannot leave a downloaded copy of a video behind. The directory is named after
the host and the parent's pid, so the next worker on the host removes those a killed (kill -9) parent left.

The child runs `fn(*args)` for a module-level `fn` (pickled by reference, so the child imports its module; spawn
gives the child the parent's sys.path). Arguments and results travel pickled over a pipe.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

_STOP_GRACE_S = 5.0  # close(): how long the child gets to exit on its own before it is killed

_parent: Connection | None = None  # in a child: its end of the pipe to the parent


def set_time_limit(seconds: float) -> None:
    """From inside an isolated call: its wall-clock limit becomes `seconds` from the call's start (the caller's
    `max_timeout_s` caps it). Outside an isolated child it does nothing, so code can call it either way."""
    if _parent is not None:
        _parent.send(("limit", float(seconds)))


class ChildCrashed(RuntimeError):
    """The child process died while running a call: killed by `signal_name` (e.g. "SIGSEGV") or exited with
    `exit_code`."""

    def __init__(self, exit_code: int | None):
        self.exit_code = exit_code
        self.signal_name = _signal_name(-exit_code) if exit_code is not None and exit_code < 0 else None
        how = f"was killed by {self.signal_name}" if self.signal_name else f"exited with code {exit_code}"
        super().__init__(f"the isolated child process {how}")


class ChildTimedOut(TimeoutError):
    """A call ran longer than its time limit; its child was killed."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        super().__init__(f"the isolated call ran longer than {timeout_s:g} s; its child process was killed")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _serve(conn: Connection, scratch: str) -> None:
    """The child's loop: run each (fn, args) received, send back ("ok", result) or ("error", exception, traceback);
    a call may also send ("limit", seconds) first."""
    global _parent
    # Ctrl-C reaches the whole process group; the parent decides what happens to a call it interrupts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _parent = conn
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:  # close()
            return
        fn, args = message
        try:
            reply = ("ok", fn(*args))
        except Exception as err:  # noqa: BLE001 - fn's errors go back to the caller; SystemExit ends the child
            reply = ("error", _portable(err), traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            return
        except Exception as err:  # noqa: BLE001 - an unpicklable result; send() pickles before it writes
            unpicklable = RuntimeError(f"the result of {_name(fn)} cannot be pickled: {err!r}")
            conn.send(("error", unpicklable, traceback.format_exc()))


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives a pickle round trip as the same type, else a RuntimeError carrying its traceback."""
    try:
        if type(pickle.loads(pickle.dumps(err))) is type(err):
            return err
    except Exception:  # noqa: BLE001 - custom exceptions often fail to unpickle (extra __init__ arguments)
        pass
    return RuntimeError("".join(traceback.format_exception(err)).rstrip())


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _stop(process: multiprocessing.Process, conn: Connection, grace_s: float, scratch: str) -> None:
    """Ask the child to exit, kill it if it does not within `grace_s`, reap it (no zombie) and remove its scratch
    directory."""
    if process.is_alive():
        try:
            conn.send(None)
        except OSError:  # the child already closed its end
            pass
        process.join(grace_s)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()
    process.close()
    shutil.rmtree(scratch, ignore_errors=True)


def _scratch_prefix(name: str) -> str:
    return f"{name}-{socket.gethostname()}-"


def _sweep_scratch(name: str) -> None:
    """Remove the scratch directories of this host's parents that are gone (killed before they could clean up)."""
    prefix = os.path.join(tempfile.gettempdir(), _scratch_prefix(name))
    for path in glob.glob(glob.escape(prefix) + "*"):
        pid = path[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


class IsolatedWorker:
    """Runs module-level functions in one persistent child process, restarted after a crash or a timeout.

        with IsolatedWorker() as worker:
            row = worker.call(decode_one, path, timeout_s=600)

    Exceptions raised by the function come back with their type and message (a note holds the child's
    traceback); one that cannot be pickled comes back as a RuntimeError with the formatted traceback. Calls are not
    thread-safe: use one worker per thread.
    """

    def __init__(self, name: str = "reelforge-isolated"):
        self.name = name
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.Process | None = None
        self._conn: Connection | None = None
        self._finalizer: weakref.finalize | None = None
        self._scratch: str | None = None

    @property
    def pid(self) -> int | None:
        """The current child's process id; None before the first call and after a crash, timeout or close()."""
        return self._process.pid if self._process is not None else None

    @property
    def scratch_dir(self) -> str | None:
        """The current child's temporary directory; removed with the child."""
        return self._scratch

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
             max_timeout_s: float | None = None) -> Any:
        """`fn(*args)` in the child. `timeout_s`: wall-clock limit for this call (None: no limit). `max_timeout_s`:
        the most the call may raise its own limit to with `set_time_limit` (None: it may not change it)."""
        if self._process is None or not self._process.is_alive():
            self._discard()
            self._start()
        try:
            self._conn.send((fn, args))
        except (BrokenPipeError, ConnectionResetError):  # the child died between calls
            raise self._crashed() from None
        try:
            reply = self._receive(timeout_s, max_timeout_s)
        except BaseException:
            # Crashed, timed out or interrupted (Ctrl-C): the child is dead or its state (and any reply still on
            # its way) is unknown, so the next call starts afresh.
            self._discard(kill=True)
            raise
        if reply[0] == "ok":
            return reply[1]
        _, err, child_traceback = reply
        err.add_note(f"raised in the isolated child process:\n{child_traceback.rstrip()}")
        raise err

    def close(self) -> None:
        """Stop the child (it exits on its own, or is killed after a grace period). The worker stays usable: the
        next call starts a new child."""
        self._discard()

    def __enter__(self) -> IsolatedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        parent_end, child_end = self._context.Pipe(duplex=True)
        _sweep_scratch(self.name)
        scratch = tempfile.mkdtemp(prefix=f"{_scratch_prefix(self.name)}{os.getpid()}-")
        process = self._context.Process(target=_serve, args=(child_end, scratch), name=self.name, daemon=True)
        process.start()
        # Only the child holds its end now, so the parent reads EOF the moment the child dies.
        child_end.close()
        self._process, self._conn, self._scratch = process, parent_end, scratch
        # Also stops the child when the worker is garbage-collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop, process, parent_end, _STOP_GRACE_S, scratch)

    def _discard(self, kill: bool = False) -> None:
        """Stop and forget the current child, if any: at once with `kill`, else gracefully."""
        if self._process is None:
            return
        if kill and self._process.is_alive():
            self._process.kill()
        self._finalizer()  # _stop: reaps the child, closes the pipe, removes its scratch directory
        self._process = self._conn = self._finalizer = self._scratch = None

    def _receive(self, timeout_s: float | None, max_timeout_s: float | None) -> tuple:
        start, limit = time.monotonic(), timeout_s
        while True:
            remaining = None if limit is None else max(0.0, start + limit - time.monotonic())
            ready = wait([self._conn, self._process.sentinel], remaining)
            if not ready:
                raise ChildTimedOut(limit)
            if not (self._conn in ready or self._conn.poll()):
                raise self._crashed()
            try:
                reply = self._conn.recv()
            except EOFError:
                raise self._crashed() from None
            if reply[0] != "limit":
                return reply
            if max_timeout_s is not None:
                limit = min(reply[1], max_timeout_s)

    def _crashed(self) -> ChildCrashed:
        """The error for a child found dead (its pipe closed): how it died, read after reaping it."""
        self._process.join(_STOP_GRACE_S)  # the pipe closes a moment before the process is reported dead
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        err = ChildCrashed(self._process.exitcode)
        self._discard()
        return err
