"""Checkpoints of a training run: sharded engine state, the EMA and `train_state.json`, staged on the node and
persisted by `ray.train.report`; the restore on (re)start; the sweep of staging folders that dead workers left."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from curation.outputs import OutputDir
from curation.redact import redact_uri
from training.config import TrainConfig, resume_hash
from training.dataset import pin_version
from training.ema import EMA
from training.engine import Engine

log = logging.getLogger("reelforge.train")

STATE_FILE = "train_state.json"
STAGING_PREFIX = "reelforge-ckpt-"


@dataclass
class TrainState:
    """What a checkpoint records besides the weights: where the run stood and what it was trained with, so a
    resumption against other data or an incompatible config can be refused with what differs."""

    step: int
    stage: str
    world_size: int
    zero_stage: int
    config_hash: str
    data_version: str
    weights_fingerprint: float

    @classmethod
    def read(cls, text: str) -> TrainState:
        data = json.loads(text)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})

    def to_json(self) -> str:
        return json.dumps(vars(self), indent=2)


def resume_problems(state: TrainState, config: TrainConfig, data_version: str) -> list[str]:
    """Why `config` on data `data_version` cannot continue the run `state` came from (empty: it can)."""
    problems = []
    if state.world_size != config.scaling.num_workers:
        problems.append(f"scaling.num_workers is {config.scaling.num_workers}, the checkpoint was written by "
                        f"{state.world_size} workers (ZeRO shards and the sample order depend on it)")
    if state.zero_stage != config.deepspeed.zero_stage:
        problems.append(f"deepspeed.zero_stage is {config.deepspeed.zero_stage}, the checkpoint's is "
                        f"{state.zero_stage}")
    if state.config_hash and state.config_hash != resume_hash(config):
        problems.append("the training config differs from the checkpoint's (model, schedule, curriculum, optimizer "
                        "or batch); compare train-config.yaml beside the output")
    if state.data_version and state.data_version != data_version and not config.accept_data_change:
        problems.append(f"the curated dataset is now {data_version}, the run trained on {state.data_version}; "
                        f"{_same_data_hint(state.data_version, config.data)}pass --accept-data-change (or --set "
                        "accept_data_change=true) to continue on it")
    return problems


def _same_data_hint(trained_on: str, data: str) -> str:
    """`--data DIR@vN` naming the dataset version a run trained on, when its data_version says which."""
    match = re.match(r"v(\d+)-lance\d+-", trained_on)
    if not match or not data:
        return ""
    return f"pass --data {redact_uri(pin_version(data, int(match[1])))} to continue on the data it trained on, or "


def _staging_directory() -> tempfile.TemporaryDirectory:
    """Node-local folder a checkpoint is written to before `ray.train.report` persists it; named by the process id
    so that `sweep_stale_staging` can tell whose it is."""
    return tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_staging(root: str | os.PathLike | None = None) -> list[Path]:
    """Removes the checkpoint staging folders of worker processes that died while saving. A worker killed by the OOM
    killer or a failure never runs its clean-up, and each such folder holds a whole checkpoint shard, so on a node that
    survives many restarts they would fill the disk. Folders of live processes (other runs on the node) are kept."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class Checkpointer:
    """Saves and restores one worker's part of a run. Every rank takes part (sharded engine state, and the EMA's
    partitions under ZeRO-3); rank 0 writes what is not sharded."""

    def __init__(self, engine: Engine, ema: EMA, config: TrainConfig, rank: int, world_size: int,
                 data_version: str):
        self.engine, self.ema, self.config = engine, ema, config
        self.rank, self.world_size, self.data_version = rank, world_size, data_version
        self.ema_file = f"ema-rank{rank:05d}.pt" if engine.zero3 else "ema.pt"

    def restore(self) -> tuple[int, float | None]:
        """(step, weights fingerprint) of the checkpoint Ray Train hands this worker; (0, None) on a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return 0, None
        with checkpoint.as_directory() as directory:
            self.engine.load(directory)
            self.ema.load_state_dict(torch.load(Path(directory) / self.ema_file, map_location="cpu",
                                                weights_only=True))
            state = TrainState.read((Path(directory) / STATE_FILE).read_text())
        fingerprint = self.engine.weights_fingerprint()
        if self.rank == 0:
            log.info("resumed from a checkpoint at step %d (weights fingerprint %.6f)", state.step, fingerprint)
        return state.step, fingerprint

    def state(self, step: int, fingerprint: float) -> TrainState:
        return TrainState(step=step, stage=self.config.stage_at(max(0, step - 1))[1].name,
                          world_size=self.world_size, zero_stage=self.config.deepspeed.zero_stage,
                          config_hash=resume_hash(self.config), data_version=self.data_version,
                          weights_fingerprint=fingerprint)

    def save(self, step: int, metrics: dict) -> TrainState:
        """A collective: every rank writes its shard, then `ray.train.report` persists the folder. Rank 0 then
        leaves the state beside the output too, where the driver checks a resumption before starting anything."""
        import ray.train
        from ray.train import Checkpoint

        state = self.state(step, self.engine.weights_fingerprint())
        with _staging_directory() as directory:
            self.engine.save(directory, client_state={"step": step})
            if self.engine.zero3 or self.rank == 0:
                torch.save(self.ema.state_dict(), Path(directory) / self.ema_file)
            if self.rank == 0:
                (Path(directory) / STATE_FILE).write_text(state.to_json())
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"step_{step:08d}")
        if self.rank == 0:
            OutputDir(self.config.output).write_bytes_atomic(STATE_FILE, state.to_json().encode())
        return state
