"""A curate run that kills itself with SIGKILL at a chosen phase, for the kill -9 tests (run as a subprocess):

    python tests/crash_helpers.py PHASE INPUT OUTPUT RAY_ADDRESS [KEY=VALUE ...]   (more config settings)

processing: after the second batch of finished videos is committed (the version's other videos are not);
verdicts:   after the run-wide filters' verdicts are committed to the clips table, before the shards take them;
tags:       after the shards and clips tables are tagged, before the videos table (the version does not exist yet).
report:     in the MLflow report, after params, metrics and tags, before the report's files are uploaded.
finalize:   after the version is tagged, before its MLflow run is closed (the version exists; the run is RUNNING).
poison:     not a kill: a file named poison*.mp4 makes the video stage run out of memory (a run error), every time.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class DyingCommitter:
    """Mixed into curation.writer.BatchCommitter: dies after its second commit of finished videos."""

    def flush(self) -> None:
        had = bool(self.records)
        super().flush()
        if had and self.committed >= 2 * self.every:
            _die()


_ORIGINAL_REPLACE = None
_TAGGED: list[str] = []


def _replace_then_die(tags, tag: str, metadata: dict) -> None:
    """Tags.replace_metadata that dies once two tables have their version tag (the lease's tag does not count)."""
    _ORIGINAL_REPLACE(tags, tag, metadata)
    if tag.startswith("v0"):
        _TAGGED.append(tag)
        if len(_TAGGED) == 2:
            _die()


def _die_on_entry(*_args, **_kwargs) -> None:
    _die()


def _poison_stage():
    """The video stage, except that a file named poison*.mp4 makes the worker run out of memory every time (what a
    decompression bomb does to a real decoder): a run error, not a bad-file verdict. A class made here is shipped to
    the Ray workers by value."""
    from curation.video_stage import VideoStage

    class PoisonStage(VideoStage):
        def _process_here(self, video_id: str, uri: str, size: int) -> dict:
            if os.path.basename(uri).startswith("poison"):
                raise MemoryError("the decoder could not allocate a frame buffer")
            return super()._process_here(video_id, uri, size)

    return PoisonStage


def arm(phase: str) -> None:
    global _ORIGINAL_REPLACE
    from lance.dataset import Tags

    from curation import writer
    from pipelines import curate

    if phase == "processing":
        curate.BatchCommitter = type("BatchCommitter", (DyingCommitter, writer.BatchCommitter), {})
    elif phase == "verdicts":
        writer._apply_to_shards = _die_on_entry
    elif phase == "tags":
        _ORIGINAL_REPLACE = Tags.replace_metadata
        Tags.replace_metadata = _replace_then_die
    elif phase == "report":
        from mlflow.tracking import MlflowClient

        MlflowClient.log_artifacts = _die_on_entry
    elif phase == "finalize":
        curate.finish_run = _die_on_entry
    elif phase == "poison":
        from curation import plan

        plan.VideoStage = _poison_stage()
    else:
        raise SystemExit(f"unknown phase {phase!r}")


def main() -> None:
    phase, source, output, address, *sets = sys.argv[1:]
    from curation.config import CurateConfig
    from pipelines.config import load_config
    from pipelines.curate import run_curate

    arm(phase)
    config = load_config(CurateConfig, None, ["output_files.commit_videos=4", f"ray.address={address}", *sets],
                         base={"input": source, "output": output})
    run_curate(config)
    raise SystemExit(f"phase {phase!r} was never reached")


if __name__ == "__main__":
    main()
