"""Stopping a run cleanly: on SIGTERM (what a preempted node and `ray job stop` send) the driver leaves a stop request
beside the run's outputs; every worker sees it within a step, all agree on the step, save a checkpoint there and end.
The rerun continues from that step."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from curation.outputs import OutputDir

STOP_FILE = "stop-requested"


def request_stop(output: str) -> None:
    OutputDir(output).write_bytes_atomic(STOP_FILE, b"SIGTERM\n")


def clear_stop(output: str) -> None:
    out = OutputDir(output)
    if out.exists(STOP_FILE):
        out.delete(STOP_FILE)


class StopWatcher:
    """Polls for the stop request at most every `poll_seconds` (cheap on object stores) and agrees across ranks
    on a small CPU all-reduce every step, so every rank stops after the same step."""

    def __init__(self, output: str, world_size: int, poll_seconds: float = 1.0):
        self.out = OutputDir(output)
        self.poll_seconds = poll_seconds
        self.last_poll = 0.0
        self.local = False
        # a CPU group: the agreement never waits on the GPU stream (NCCL would need a device tensor)
        self.group = dist.new_group(backend="gloo") if world_size > 1 and dist.is_initialized() else None

    def requested(self) -> bool:
        now = time.monotonic()
        if not self.local and now - self.last_poll >= self.poll_seconds:
            self.last_poll = now
            self.local = self.out.exists(STOP_FILE)
        if self.group is None:
            return self.local
        flag = torch.tensor([1 if self.local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
