"""One run at a time per output: a lease held as a Lance tag, with a heartbeat and the takeover of a dead holder.

Creating a tag is atomic in Lance (a second create of the same name fails, on local disks, where it is an exclusive
create, and on object stores, where it is a conditional put), so two runs started together cannot both hold the lease:
the second stops with a message that names the first. The holder refreshes the lease's heartbeat while it runs and
removes it at the end. A lease whose holder is gone (a process on this host that no longer exists, or no heartbeat
for `timeout_s` from another host) is taken over, which is how a rerun after kill -9 resumes at once.

Two outputs hold leases: a curated dataset (the tag `curate-lock` on its `videos` table, `CurateLock`, which also
keeps the MLflow run id of the version being made) and a training or distillation output (the tag `owner` on a
one-row Lance dataset `OUTPUT/owner.lance`, `OutputLock`), so two trainings cannot share checkpoints and a run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime

import lance
import pyarrow as pa

from curation.dataset import CuratedDataset, lance_location
from curation.redact import redact_uri

log = logging.getLogger(__name__)

LOCK_TAG = "curate-lock"
OWNER_TAG = "owner"
OWNER_TABLE = "owner.lance"
DEFAULT_TIMEOUT_S = 600.0


class OutputBusy(RuntimeError):
    """Another run holds the output's lease."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VideosTable:
    """Where a curated dataset's lease lives: its `videos` table."""

    def __init__(self, dataset: CuratedDataset):
        self.dataset, self.shown = dataset, dataset.shown

    def open(self) -> lance.LanceDataset:
        return self.dataset.open("videos")


class OwnerTable:
    """Where a training output's lease lives: `OUTPUT/owner.lance`, a one-row Lance dataset made for it."""

    def __init__(self, output: str):
        location, self.options = lance_location(output)
        self.uri, self.shown = f"{location.rstrip('/')}/{OWNER_TABLE}", redact_uri(output)

    def open(self) -> lance.LanceDataset:
        try:
            return lance.dataset(self.uri, storage_options=self.options or None)
        except (ValueError, FileNotFoundError, OSError):
            pass
        try:  # two runs may create it together: one create wins, the other opens what it made
            return lance.write_dataset(pa.table({"owner": ["reelforge"]}), self.uri, mode="create",
                                       storage_options=self.options or None)
        except (ValueError, OSError):
            return lance.dataset(self.uri, storage_options=self.options or None)


class Lease:
    """The lease on one output; use as a context manager around everything a run writes."""

    doing = "in use by another run"  # how the refusal says what the holder does

    def __init__(self, table, tag: str, what: str, timeout_s: float, heartbeat_s: float | None = None,
                 setting: str = "output_files.lock_timeout_s"):
        self.table, self.tag, self.what, self.setting = table, tag, what, setting
        self.shown, self.timeout_s = table.shown, timeout_s
        self.heartbeat_s = heartbeat_s or max(1.0, timeout_s / 4)
        self.holder = {"host": socket.gethostname(), "pid": str(os.getpid()), "started": f"{time.time():.3f}"}
        self.previous: dict = {}  # the metadata of a dead holder we took over from
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _tag(self) -> dict | None:
        return self.table.open().tags.list().get(self.tag)

    def acquire(self) -> None:
        table = self.table.open()
        for _ in range(2):
            try:
                table.tags.create(self.tag, table.version)
                break
            except ValueError:
                tag = self._tag()
                if tag is None:
                    continue  # released meanwhile: try again
                problem = self._busy(tag)
                if problem:
                    raise OutputBusy(problem) from None
                self.previous = dict(tag.get("metadata") or {})
                log.warning("taking over the lease of %s from a %s that is gone (pid %s on %s)", self.shown,
                            self.what, self.previous.get("pid", "?"), self.previous.get("host", "?"))
                self.table.open().tags.delete(self.tag)
        else:
            raise OutputBusy(f"{self.shown}: another {self.what} took the lease at the same moment")
        self.write(heartbeat=True)
        self._thread = threading.Thread(target=self._beat, name=f"{self.tag}-lease", daemon=True)
        self._thread.start()

    def _busy(self, tag: dict) -> str | None:
        """Why the lease is not ours to take, or None when its holder is gone."""
        meta = tag.get("metadata") or {}
        created = tag.get("created_at")
        beat = float(meta.get("heartbeat", created.timestamp() if isinstance(created, datetime) else 0.0))
        age = time.time() - beat
        host, pid = meta.get("host"), meta.get("pid")
        if host == self.holder["host"] and pid and pid.isdigit():
            if not _alive(int(pid)):
                return None
        elif age > self.timeout_s:
            return None
        return (f"{self.shown} is {self.doing} (pid {pid or '?'} on {host or '?'}, last heartbeat "
                f"{age:.0f} s ago): wait for it to finish; a run that died on another host is taken over once its "
                f"lease is {self.timeout_s:.0f} s old ({self.setting})")

    def write(self, heartbeat: bool = False, **fields: str) -> None:
        """Record fields (e.g. the MLflow run id) in the lease, refreshing its heartbeat."""
        if heartbeat or fields:
            self.holder.update(fields)
            self.holder["heartbeat"] = f"{time.time():.3f}"
            self.table.open().tags.replace_metadata(self.tag, dict(self.holder))

    def check(self) -> None:
        """Raise when the lease was lost (taken over by another run while this one stalled)."""
        if self.lost.is_set():
            raise OutputBusy(f"{self.shown}: this run lost its lease to another {self.what}; stopping without "
                             "writing more")

    def _mine(self, tag: dict | None) -> bool:
        meta = (tag or {}).get("metadata") or {}
        return meta.get("started") == self.holder["started"] and meta.get("pid") == self.holder["pid"]

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._mine(self._tag()):
                    self.lost.set()
                    return
                self.write(heartbeat=True)
            except Exception:  # noqa: BLE001 - a missed beat is retried; a long outage shows as a stale lease
                log.warning("could not refresh the lease on %s", self.shown, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost.is_set():
            return
        try:
            tag = self._tag()
            if tag is not None and (tag.get("metadata") or {}).get("pid") == self.holder["pid"]:
                self.table.open().tags.delete(self.tag)
        except Exception:  # noqa: BLE001 - a lease left behind is taken over by the next run
            log.warning("could not remove the lease on %s", self.shown, exc_info=True)


class CurateLock(Lease):
    """One curation run at a time on a curated dataset."""

    doing = "being curated by another run"

    def __init__(self, dataset: CuratedDataset, timeout_s: float, heartbeat_s: float | None = None):
        super().__init__(VideosTable(dataset), LOCK_TAG, "curation run", timeout_s, heartbeat_s)
        self.dataset = dataset


class OutputLock(Lease):
    """One training (or distillation) run at a time on an output folder: its checkpoints and MLflow run."""

    doing = "being written by another training run"

    def __init__(self, output: str, timeout_s: float = DEFAULT_TIMEOUT_S, heartbeat_s: float | None = None):
        super().__init__(OwnerTable(output), OWNER_TAG, "training run", timeout_s, heartbeat_s,
                         setting="a lease with no heartbeat for that long")
