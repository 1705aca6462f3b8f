"""Reading the next micro-batches while the step runs: one pattern for every loader whose micro-batch k is a pure
function of k (the latent cache's and the one-frame stages'; StageLoader shares decoded rows between batches and keeps
its own)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor


class ReadAhead:
    """Base of a loader: `batch(k)` returns `_read(k)`, with micro-batches k+1..k+`prefetch` already submitted to a
    thread pool; batches behind k or beyond the window (a resume elsewhere) are cancelled. A context manager."""

    def __init__(self, prefetch: int, threads: int, name: str):
        self.prefetch = max(0, prefetch)
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=name)
        self._pending: dict[int, Future] = {}

    def _read(self, k: int):
        raise NotImplementedError

    def batch(self, k: int):
        for stale in [j for j in self._pending if not k <= j <= k + self.prefetch]:
            self._pending.pop(stale).cancel()
        for j in range(k, k + 1 + self.prefetch):
            if j not in self._pending:
                self._pending[j] = self._pool.submit(self._read, j)
        return self._pending.pop(k).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
