"""Checkpoint staging folders of dead workers are swept; those of live processes and foreign folders are kept."""

import os
import subprocess
import sys
from pathlib import Path

from training.checkpoint import STAGING_PREFIX, _staging_directory, sweep_stale_staging


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_folders_of_dead_workers_are_removed(tmp_path):
    dead = tmp_path / f"{STAGING_PREFIX}{_dead_pid()}-abc123"
    (dead / "ds").mkdir(parents=True)
    (dead / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1024)
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-def456"
    live.mkdir()
    old_style = tmp_path / f"{STAGING_PREFIX}q1w2e3"  # no pid in the name: not ours to judge
    old_style.mkdir()
    unrelated = tmp_path / "other-99999999-x"
    unrelated.mkdir()

    removed = sweep_stale_staging(tmp_path)

    assert removed == [dead]
    assert not dead.exists()
    assert live.exists() and old_style.exists() and unrelated.exists()


def test_a_staging_folder_carries_its_process_id():
    with _staging_directory() as directory:
        name = os.path.basename(directory)
        assert name.startswith(f"{STAGING_PREFIX}{os.getpid()}-")
        assert Path(directory) not in sweep_stale_staging(os.path.dirname(directory))
        assert os.path.isdir(directory)
