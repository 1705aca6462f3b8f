"""A model export is written whole into a folder nothing overwrites, what a killed export leaves is swept, and a
model version is registered once per run even when the registering process is killed with SIGKILL between creating
the version and recording it (issue 13 item 8). Real files, real MLflow store, real SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.publish import MODELS, POINTER, current_model, folder_digest, publish_model, sweep_temporary


def _export(directory: Path, weights: bytes) -> Path:
    """The files save_model writes (contents do not matter to publishing)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(weights)
    (directory / "config.json").write_text(json.dumps({"model": {"depth": 1}}))
    return directory


def test_an_export_goes_whole_into_a_folder_named_by_its_bytes_and_model_points_at_it(tmp_path):
    out = tmp_path / "train"
    first = publish_model(_export(tmp_path / "e1", b"weights one"), str(out))
    folder = out / MODELS / first[:16]
    assert first == folder_digest(folder) == folder_digest(tmp_path / "e1")
    assert (out / "model").resolve() == folder.resolve()
    assert (out / "model" / "model.safetensors").read_bytes() == b"weights one"
    assert current_model(str(out)) == {"sha256": first, "folder": f"{MODELS}/{first[:16]}"}

    second = publish_model(_export(tmp_path / "e2", b"weights two"), str(out))
    assert second != first
    assert (out / "model" / "model.safetensors").read_bytes() == b"weights two"
    # the first export, which a registered version may point at, is untouched
    assert (folder / "model.safetensors").read_bytes() == b"weights one"
    assert folder_digest(folder) == first
    assert sorted(p.name for p in (out / MODELS).iterdir()) == sorted([first[:16], second[:16]])


def test_an_export_made_before_this_layout_is_replaced_whole(tmp_path):
    out = tmp_path / "train"
    _export(out / "model", b"old weights")  # model/ as a real folder, as older runs wrote it
    sha = publish_model(_export(tmp_path / "e", b"new weights"), str(out))
    assert (out / "model").is_symlink() and (out / "model" / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in (out / MODELS).iterdir()) == [sha[:16]]  # the set-aside folder is swept


KILL_BEFORE_RENAME = """
import os, signal, sys
from pathlib import Path
import training.publish as publish
def dying_rename(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
publish.os.rename = dying_rename
publish.publish_model(sys.argv[1], sys.argv[2])
"""


def test_an_export_killed_before_its_rename_leaves_the_old_model_whole_and_is_swept(tmp_path):
    out = tmp_path / "train"
    first = publish_model(_export(tmp_path / "e1", b"weights one"), str(out))
    (out / "train_state.json.tmp-0badc0de").write_text("{half")  # an atomic write a kill interrupted
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_RENAME, str(_export(tmp_path / "e2", b"two")),
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = [p.name for p in (out / MODELS).iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the copy it was about to rename
    assert (out / "model" / "model.safetensors").read_bytes() == b"weights one"
    assert current_model(str(out))["sha256"] == first
    removed = sweep_temporary(str(out))
    assert sorted(Path(p).name for p in removed) == sorted([leftovers[0], "train_state.json.tmp-0badc0de"])
    assert sorted(p.name for p in (out / MODELS).iterdir()) == [first[:16]]
    assert (out / POINTER).is_file() and (out / "model").is_symlink()


KILL_AFTER_CREATE = """
import os, signal, sys
from mlflow.tracking import MlflowClient
from pipelines import tracking
from pipelines.train import _register
from training.config import TrainConfig

original = MlflowClient.set_tag
def dying_set_tag(self, run_id, key, value, *args, **kwargs):
    if key == "reelforge.model_version":  # the version exists; the run does not know it yet
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, run_id, key, value, *args, **kwargs)
MlflowClient.set_tag = dying_set_tag
uri, output = sys.argv[1], sys.argv[2]
run_id = tracking.open_run(uri, "reelforge-test", run_name="train")
print(run_id, flush=True)
_register(tracking.client_for(uri), run_id, TrainConfig(output=output))
"""


@pytest.mark.slow
def test_registration_killed_between_version_and_tag_is_not_duplicated_on_rerun(tmp_path):
    from pipelines import tracking
    from pipelines.train import SHA_TAG, _register
    from training.config import TrainConfig

    out = tmp_path / "train"
    sha = publish_model(_export(tmp_path / "e", b"weights"), str(out))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_CREATE, uri, str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == -9, proc.stderr[-3000:]
    run_id = proc.stdout.split()[0]
    client = tracking.client_for(uri)
    name = TrainConfig().tracking.registered_model
    assert len(client.search_model_versions(f"name = '{name}'")) == 1  # it died after creating the version

    version = _register(client, run_id, TrainConfig(output=str(out)))  # the rerun
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == [version] == ["1"]
    assert versions[0].tags[SHA_TAG] == sha
    assert client.get_run(run_id).data.tags["reelforge.model_version"] == "1"
    assert _register(client, run_id, TrainConfig(output=str(out))) == "1"  # and again: still one


def test_a_dangling_run_is_closed_with_a_reason_and_a_live_one_is_not_touched(tmp_path):
    from pipelines import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dangling = tracking.open_run(uri, "reelforge-test", run_name="killed")
    finished = tracking.open_run(uri, "reelforge-test", run_name="done")
    tracking.finish_run(uri, finished)
    assert tracking.close_dangling(uri, dangling, "its process was killed")
    assert not tracking.close_dangling(uri, finished, "no")
    client = tracking.client_for(uri)
    assert client.get_run(dangling).info.status == "KILLED"
    assert client.get_run(dangling).data.tags[tracking.CLOSED_TAG] == "its process was killed"
    assert client.get_run(finished).info.status == "FINISHED"
    assert tracking.CLOSED_TAG not in client.get_run(finished).data.tags


@pytest.mark.slow
def test_a_real_export_is_published_registered_from_its_immutable_folder_and_loads(tmp_path):
    """save_model's real files through publish and _register: the registered version's artifacts are the
    models/<sha16> bytes, `model` loads, and a newer export leaves the registered bytes alone."""
    from test_generate import _export as real_export

    from pipelines import tracking
    from pipelines.train import SHA_TAG, _register
    from training.config import TrainConfig
    from training.export import load_model

    out = tmp_path / "train"
    sha = publish_model(real_export(tmp_path / "e1", 0, {"num_steps": 2, "cfg_scale": 1.0}), str(out))
    assert load_model(out / "model").config["sampling"]["num_steps"] == 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.open_run(uri, "reelforge-test", run_name="train")
    client = tracking.client_for(uri)
    version = _register(client, run_id, TrainConfig(output=str(out)))
    registered = client.get_model_version(TrainConfig().tracking.registered_model, version)
    assert registered.tags[SHA_TAG] == sha and registered.run_id == run_id
    downloaded = Path(client.download_artifacts(run_id, "model", str(tmp_path / "dl")))
    weights = next(downloaded.rglob("model.safetensors")).parent  # inside the pyfunc model (training/pyfunc.py)
    assert folder_digest(weights) == sha  # the registered bytes are the published folder's
    publish_model(real_export(tmp_path / "e2", 1, {"num_steps": 2, "cfg_scale": 1.0}), str(out))
    assert folder_digest(out / MODELS / sha[:16]) == sha  # a newer export did not touch them
