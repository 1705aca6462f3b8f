"""The workflow's bookkeeping without Ray: what changes a step's config hash, and what a changed step does to its
old outputs."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.workflow import (
    WorkflowConfig,
    _set_aside,
    config_hash,
    has_finished_version,
    input_fingerprint,
    run_workflow,
)
from training.config import TrainConfig


def test_hash_ignores_where_mlflow_logs_but_not_what_the_step_does():
    base = load_config(TrainConfig, None, [])
    moved = load_config(TrainConfig, None, ["tracking.uri=http://mlflow:5000", "tracking.parent_run_id=abc"])
    changed = load_config(TrainConfig, None, ["optim.lr=3e-4"])
    assert config_hash(base, []) == config_hash(moved, [])
    assert config_hash(base, []) != config_hash(changed, [])
    assert config_hash(base, ["upstream-a"]) != config_hash(base, ["upstream-b"])  # new curated data: retrain
    assert config_hash(base, [], {"files": 3}) != config_hash(base, [], {"files": 4})


def test_a_grown_dump_changes_the_input_fingerprint(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x" * 10)
    first = input_fingerprint(str(tmp_path))
    assert input_fingerprint(str(tmp_path)) == first
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.mp4").write_bytes(b"y" * 5)
    grown = input_fingerprint(str(tmp_path))
    assert grown["files"] == 2 and grown != first
    # a remote dump is listed too (tests/test_s3.py, against a real S3-compatible server), not fingerprinted by its URI


def test_training_steps_hash_the_curated_rows_not_the_dump_file_times(tmp_path):
    """The train and distill steps' inputs are the curated version they read (its content), so touching a video in
    the dump (which reruns the no-op curate step) retrains nothing, and a new curated version does."""
    import os

    from test_dataset import _write_version

    from pipelines.workflow import data_fingerprint
    from training.dataset import ClipTable

    dump, curated = tmp_path / "dump", tmp_path / "curated"
    dump.mkdir()
    (dump / "a.mp4").write_bytes(b"x" * 10)
    _write_version(curated, 1, range(8))
    before, listing = data_fingerprint(str(curated)), input_fingerprint(str(dump))
    assert before == ClipTable.open(str(curated)).version and before.startswith("v1-lance")
    os.utime(dump / "a.mp4", ns=(1, 1))
    assert input_fingerprint(str(dump)) != listing  # the curate step runs again (and finds nothing new)
    assert data_fingerprint(str(curated)) == before  # but what training reads did not change
    _write_version(curated, 2, range(8, 12))
    assert data_fingerprint(str(curated)).startswith("v2-lance")
    assert data_fingerprint(str(tmp_path / "nothing")).startswith("unreadable")


def test_distill_and_evaluate_hash_the_models_bytes(tmp_path):
    from pipelines.workflow import model_fingerprint
    from training.publish import folder_digest, publish_model

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"one")
    sha = publish_model(str(export), str(tmp_path / "train"))
    assert model_fingerprint(str(tmp_path / "train" / "model")) == sha == model_fingerprint(str(tmp_path / "train"))
    assert model_fingerprint(str(export)) == folder_digest(export) == sha  # a folder the user named
    (export / "model.safetensors").write_bytes(b"two")
    assert model_fingerprint(str(export)) != sha
    assert model_fingerprint(str(tmp_path / "gone")) == "missing"


def test_the_curate_step_is_done_once_its_dataset_has_a_finished_version(tmp_path):
    """A curate run interrupted before its first version leaves the Lance tables without a version: not done."""
    from curation.dataset import CuratedDataset
    from curation.writer import create_tables, tag_version

    out = tmp_path / "curated"
    assert not has_finished_version(out)
    dataset = CuratedDataset(str(out))
    create_tables(dataset)
    assert (out / "videos.lance").is_dir() and not has_finished_version(out)
    tag_version(dataset, 1, {"dataset_version": 1})
    assert has_finished_version(out)


def test_changed_step_keeps_its_old_outputs_beside_the_new_folder(tmp_path):
    train = tmp_path / "train"
    (train / "model").mkdir(parents=True)
    (train / "model" / "config.json").write_text("{}")
    _set_aside(train, "0123456789abcdef")
    assert not train.exists()
    assert (tmp_path / "train.stale-01234567" / "model" / "config.json").read_text() == "{}"
    train.mkdir()
    _set_aside(train, "0123456789abcdef")  # the same old hash twice: a second folder, nothing overwritten
    assert (tmp_path / "train.stale-01234567-1").is_dir()


def test_unknown_steps_are_refused_before_anything_runs(tmp_path):
    config = load_config(WorkflowConfig, None, ["steps=[curate, finetune]"], base={"workdir": str(tmp_path / "wd")})
    with pytest.raises(ConfigError, match="unknown step 'finetune'"):
        run_workflow(config)
    assert not (tmp_path / "wd").exists()


def test_workflow_state_is_written_whole_through_a_temporary_file_of_its_own(tmp_path):
    """No fixed temporary name (two runs, or a leftover folder, cannot collide), nothing left beside the file."""
    import json

    from pipelines.workflow import _State

    (tmp_path / "workflow.tmp").mkdir()  # what a fixed name would trip over
    state = _State(tmp_path)
    state.update("curate", status="running", summary={"tracking": "sqlite:///x"})
    assert json.loads((tmp_path / "workflow.json").read_text())["steps"]["curate"]["status"] == "running"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workflow.json", "workflow.tmp"]


def test_a_set_aside_output_closes_the_run_a_killed_step_left_running(tmp_path):
    from pipelines import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.open_run(uri, "reelforge-test", run_name="train")  # a training killed mid-run left it RUNNING
    train = tmp_path / "train"
    train.mkdir()
    (train / tracking.RUN_ID_FILE).write_text(run_id)
    _set_aside(train, "0123456789abcdef", uri)
    run = tracking.client_for(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert "train.stale-01234567" in run.data.tags[tracking.CLOSED_TAG]
