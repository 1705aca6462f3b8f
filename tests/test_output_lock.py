"""One training (or distillation) run per output (issue 13 item 6): a second run on a held output stops before it
writes anything, with one line naming the holder (CLI exit 2); a lease left by a run killed with SIGKILL is taken
over at once; one from another host once its heartbeat is older than the timeout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_dataset import _write_version

from curation.lock import OWNER_TAG, OutputBusy, OutputLock, OwnerTable

HOLD = """
import sys, time
from curation.lock import OutputLock
lock = OutputLock(sys.argv[1], heartbeat_s=0.2)
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A real process holding the lease on tmp_path/out, as a running `reelforge train` does."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("curated")
    _write_version(root, 1, range(8))
    return str(root)


def test_a_second_training_on_a_held_output_exits_2_naming_the_holder(holder, curated, capsys):
    from pipelines.cli import main

    out, proc = holder
    before = sorted(p.name for p in out.iterdir())
    assert main(["train", "--data", curated, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {proc.pid} on {socket.gethostname()}" in err[0], err
    assert "being written by another training run" in err[0]
    # nothing of the holder's was touched: no config, no MLflow run id, no checkpoint
    assert sorted(p.name for p in out.iterdir()) == before == ["owner.lance"]


def test_a_second_distillation_on_a_held_output_stops(holder, curated, tmp_path):
    from pipelines.distill import run_distill
    from training.distill import DistillConfig

    out, proc = holder
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"sampling": {"num_steps": 8, "cfg_scale": 1.0}}))
    config = DistillConfig(teacher=str(teacher), data=curated, output=str(out), teacher_steps=8)
    with pytest.raises(OutputBusy, match=rf"pid {proc.pid} "):
        run_distill(config)
    assert not (out / "distill-config.yaml").exists()


def test_the_lease_of_a_run_killed_with_sigkill_is_taken_over_at_once(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = OutputLock(str(out), timeout_s=3600)
    with lock:
        assert lock.previous["pid"] == str(proc.pid)
        held = OwnerTable(str(out)).open().tags.list()[OWNER_TAG]["metadata"]
        assert held["pid"] == str(os.getpid())
    assert OWNER_TAG not in OwnerTable(str(out)).open().tags.list()


def test_a_lease_from_another_host_is_taken_over_only_once_stale(tmp_path):
    out = str(tmp_path / "out")
    owner = OwnerTable(out).open()
    owner.tags.create(OWNER_TAG, owner.version)
    owner.tags.replace_metadata(OWNER_TAG, {"host": "elsewhere-7", "pid": "4242", "started": "1.0",
                                            "heartbeat": f"{time.time():.3f}"})
    with pytest.raises(OutputBusy, match="pid 4242 on elsewhere-7"):
        OutputLock(out, timeout_s=2).acquire()
    time.sleep(2.5)
    with OutputLock(out, timeout_s=2) as lock:
        assert lock.previous["host"] == "elsewhere-7"


def test_two_leases_taken_together_give_one_holder(tmp_path):
    """Processes racing for a fresh output (owner.lance not yet made): exactly one wins."""
    out = str(tmp_path / "out")
    race = ("import sys\nfrom curation.lock import OutputLock, OutputBusy\n"
            "try:\n    OutputLock(sys.argv[1]).acquire()\n    print('won', flush=True)\n"
            "except OutputBusy:\n    print('busy', flush=True)\n"
            "sys.stdin.read()\n")  # the winner stays alive (holding) until every result is in
    procs = [subprocess.Popen([sys.executable, "-c", race, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    try:
        results = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    assert results == ["busy", "busy", "won"], results
