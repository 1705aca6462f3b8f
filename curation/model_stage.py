"""What the model stages (captions, CLIP scores) share: an error in one video's row quarantines that video only."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow as pa

from curation import schema
from curation.decode import is_run_error  # one rule for what is the run's fault, not the video's
from curation.redact import redact_uri

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 1000


def quarantined(video: dict, error_class: str, message: str) -> dict:
    """The video's row without its clips and with the reason, as VideoStage quarantines a file it cannot decode."""
    row = dict(video)
    row.update(status="quarantined", error_class=error_class, error_message=message[:MAX_MESSAGE_CHARS], clips=[])
    return row


def per_video(batch: pa.Table, fill: Callable[[list[dict]], None], error_class: str) -> pa.Table:
    """`fill` completes the clips of staged video rows in place, several videos per model call. When it raises on
    the batch, each video is retried alone from its input row, and a video that still fails is quarantined with
    `error_class` and the error's one-line message; the other videos of the batch go on."""
    try:
        videos = batch.to_pylist()
        fill(videos)
        return pa.Table.from_pylist(videos, schema=schema.STAGED)
    except Exception as err:  # noqa: BLE001 - retried per video below; run errors are raised there
        if is_run_error(err):
            raise
        if batch.num_rows == 1:
            return pa.Table.from_pylist([_quarantine(batch.to_pylist()[0], error_class, err)], schema=schema.STAGED)
    tables = []
    for i in range(batch.num_rows):
        video = batch.slice(i, 1).to_pylist()[0]  # a fresh copy: nothing the failed batch half-filled
        try:
            fill([video])
            tables.append(pa.Table.from_pylist([video], schema=schema.STAGED))
        except Exception as err:  # noqa: BLE001 - one bad video must not stop the run; the reason is recorded
            if is_run_error(err):
                raise
            tables.append(pa.Table.from_pylist([_quarantine(video, error_class, err)], schema=schema.STAGED))
    return pa.concat_tables(tables)


def _quarantine(video: dict, error_class: str, err: Exception) -> dict:
    log.warning("%s: %s: %s: %s; the video is quarantined", redact_uri(video.get("uri") or ""), error_class,
                type(err).__name__, err, exc_info=err)
    return quarantined(video, error_class, f"{type(err).__name__}: {err}")


class StageActor:
    """A stage (settings in __init__, heavy state in setup()) as a Ray Data actor: setup once per worker. Curation's
    and the latent encode's actor pools both run their stages through it."""

    def __init__(self, stage_cls, *args):
        self.stage = stage_cls(*args)
        self.stage.setup()

    def __call__(self, batch):
        return self.stage(batch)
