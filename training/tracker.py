"""MLflow logging from a training worker: rank 0 logs into the run the driver opened; other ranks log nothing."""

from __future__ import annotations

import contextlib
import json
import time

from curation.outputs import OutputDir


class WorkerTracker:
    """One MLflow run, created by the driver, across worker restarts; a no-op off rank 0 or without a run."""

    def __init__(self, rank: int, uri: str | None, run_id: str | None, output: str):
        self.client = None
        self.run_id = run_id
        self.rank = rank
        self.output = output
        if rank == 0 and uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def artifact(self, path: str, artifact_path: str) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def progress(self, record: dict) -> None:
        """A small progress file beside the run (step, loss, pid, ...) for people and tools watching a long run."""
        if self.rank == 0:
            with contextlib.suppress(OSError):
                OutputDir(self.output).write_bytes_atomic("progress.json", json.dumps(record).encode())
