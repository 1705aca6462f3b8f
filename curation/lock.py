"""One curation run at a time per output: a lease held as a Lance tag on the `videos` table.

Creating a tag is atomic in Lance (a second create of the same name fails, on local disks and object stores alike),
so two runs started together cannot both hold the lease: the second stops with a message that names the first. The
holder refreshes the lease's heartbeat while it runs and removes it at the end. A lease whose holder is gone (a
process on this host that no longer exists, or no heartbeat for `timeout_s` from another host) is taken over, which
is how a rerun after kill -9 resumes at once. The lease also keeps the MLflow run id of the version being made, so
the run that finishes an interrupted version logs into the same MLflow run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime

from curation.dataset import CuratedDataset

log = logging.getLogger(__name__)

LOCK_TAG = "curate-lock"


class OutputBusy(RuntimeError):
    """Another curation run holds the output's lease."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CurateLock:
    """The lease on one output; use as a context manager around everything a run writes."""

    def __init__(self, dataset: CuratedDataset, timeout_s: float, heartbeat_s: float | None = None):
        self.dataset, self.timeout_s = dataset, timeout_s
        self.heartbeat_s = heartbeat_s or max(1.0, timeout_s / 4)
        self.holder = {"host": socket.gethostname(), "pid": str(os.getpid()), "started": f"{time.time():.3f}"}
        self.previous: dict = {}  # the metadata of a dead holder we took over from
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    def __enter__(self) -> CurateLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        videos = self.dataset.open("videos")
        for _ in range(2):
            try:
                videos.tags.create(LOCK_TAG, videos.version)
                break
            except ValueError:
                tag = self.dataset.open("videos").tags.list().get(LOCK_TAG)
                if tag is None:
                    continue  # released meanwhile: try again
                problem = self._busy(tag)
                if problem:
                    raise OutputBusy(problem) from None
                self.previous = dict(tag.get("metadata") or {})
                log.warning("taking over the lease of %s from a curation run that is gone (pid %s on %s)",
                            self.dataset.shown, self.previous.get("pid", "?"), self.previous.get("host", "?"))
                self.dataset.open("videos").tags.delete(LOCK_TAG)
        else:
            raise OutputBusy(f"{self.dataset.shown}: another curation run took the lease at the same moment")
        self.write(heartbeat=True)
        self._thread = threading.Thread(target=self._beat, name="curate-lease", daemon=True)
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
        return (f"{self.dataset.shown} is being curated by another run (pid {pid or '?'} on {host or '?'}, "
                f"last heartbeat {age:.0f} s ago): wait for it to finish; a run that died on another host is taken "
                f"over once its lease is {self.timeout_s:.0f} s old (output_files.lock_timeout_s)")

    def write(self, heartbeat: bool = False, **fields: str) -> None:
        """Record fields (e.g. the MLflow run id) in the lease, refreshing its heartbeat."""
        if heartbeat or fields:
            self.holder.update(fields)
            self.holder["heartbeat"] = f"{time.time():.3f}"
            self.dataset.open("videos").tags.replace_metadata(LOCK_TAG, dict(self.holder))

    def check(self) -> None:
        """Raise when the lease was lost (taken over by another run while this one stalled)."""
        if self.lost.is_set():
            raise OutputBusy(f"{self.dataset.shown}: this run lost its lease to another curation run; stopping "
                             "without committing more")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                tag = self.dataset.open("videos").tags.list().get(LOCK_TAG)
                mine = tag is not None and (tag.get("metadata") or {}).get("started") == self.holder["started"] \
                    and (tag.get("metadata") or {}).get("pid") == self.holder["pid"]
                if not mine:
                    self.lost.set()
                    return
                self.write(heartbeat=True)
            except Exception:  # noqa: BLE001 - a missed beat is retried; a long outage shows as a stale lease
                log.warning("could not refresh the lease on %s", self.dataset.shown, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost.is_set():
            return
        try:
            tag = self.dataset.open("videos").tags.list().get(LOCK_TAG)
            if tag is not None and (tag.get("metadata") or {}).get("pid") == self.holder["pid"]:
                self.dataset.open("videos").tags.delete(LOCK_TAG)
        except Exception:  # noqa: BLE001 - a lease left behind is taken over by the next run
            log.warning("could not remove the lease on %s", self.dataset.shown, exc_info=True)
