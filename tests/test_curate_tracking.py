"""The curate workflow's MLflow bookkeeping against a real SQLite store, without Ray."""

import pyarrow.fs as pafs
import pytest

from curation.config import CurateConfig
from curation.dataset import CuratedDataset
from curation.outputs import OutputDir
from curation.writer import VersionWrite, create_tables
from pipelines.curate import RUN_KEY, _public_uri, _start_run, curate_tracking_uri, log_version_to_mlflow


@pytest.fixture
def no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_store_defaults_beside_a_local_output_or_in_the_working_directory(tmp_path, monkeypatch, no_env_store):
    config = CurateConfig(output=str(tmp_path / "out"))
    assert curate_tracking_uri(config, OutputDir(config.output)) == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    remote = OutputDir(str(tmp_path / "bucket"))
    remote.fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not a local filesystem
    monkeypatch.chdir(tmp_path)
    assert curate_tracking_uri(config, remote) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert curate_tracking_uri(config, remote) == "http://mlflow.internal:5000"
    config.tracking.uri = "sqlite:///elsewhere.db"
    assert curate_tracking_uri(config, remote) == "sqlite:///elsewhere.db"
    config.tracking.enabled = False
    assert curate_tracking_uri(config, remote) is None
    assert _public_uri("https://user:secret@mlflow.example.com:8443/x") == "https://mlflow.example.com:8443/x"


def _written(untrained: bool) -> VersionWrite:
    counts = {"videos": 3, "videos_ok": 2, "quarantined": {"decode_error": 1}, "clips": 5, "clips_kept": 3,
              "clips_dropped": 2, "drop_reasons": {"duration": 1, "aesthetic": 2}, "video_seconds": 20.0,
              "superseded": 0}
    return VersionWrite(version=2, counts=counts, bounds=[], untrained=untrained,
                        warnings=["filters on aesthetic APPLIED to scores from UNTRAINED"], retried=[])


def test_one_run_per_version_resumed_after_an_interruption(tmp_path, no_env_store):
    from mlflow.tracking import MlflowClient

    dataset = CuratedDataset(str(tmp_path))
    create_tables(dataset)
    config = CurateConfig(input="/dump", output=str(tmp_path))
    config.filters.apply_on_untrained = True
    uri = curate_tracking_uri(config, OutputDir(str(tmp_path)))
    first = _start_run(uri, config, dataset, 2)
    assert dataset.open("videos").config()[RUN_KEY.format(tag="v0002")] == first  # kept with the data
    assert _start_run(uri, config, dataset, 2) == first  # the interrupted run goes on in the same MLflow run
    report = tmp_path / "report"
    report.mkdir()
    (report / "histograms.png").write_bytes(b"\x89PNG")
    run = {"wall_seconds": 4.0, "videos_processed": 3, "video_seconds_processed": 20.0,
           "video_seconds_per_wall_second": 5.0}
    log_version_to_mlflow(uri, first, config, _written(untrained=True), run, report, retry_quarantined=False)
    client = MlflowClient(tracking_uri=uri)
    data = client.get_run(first).data
    assert data.params["filters.apply_on_untrained"] == "True" and data.params["output"] == str(tmp_path)
    assert data.metrics["clips_kept"] == 3 and data.metrics["dropped_by.aesthetic"] == 2
    assert data.metrics["quarantined.decode_error"] == 1 and data.metrics["video_seconds_per_wall_second"] == 5.0
    assert data.tags["scores_untrained"] == "true" and data.tags["untrained_filters"] == "applied"
    assert data.tags["dataset_version"] == "2" and "UNTRAINED" in data.tags["warnings"]
    assert {a.path for a in client.list_artifacts(first, "report")} == {"report/histograms.png"}
    assert "config.yaml" in {a.path for a in client.list_artifacts(first)}
    # Logging the same version again (a resumed run) keeps the params and does not fail.
    log_version_to_mlflow(uri, first, config, _written(untrained=True), run, None, retry_quarantined=False)
    # The next version opens a new run, even if version 2's run id was left behind in the table's config.
    second = _start_run(uri, config, dataset, 3)
    assert second != first and client.get_run(second).info.run_name == f"curate-{tmp_path.name}-v0003"
    assert dataset.open("videos").config()[RUN_KEY.format(tag="v0003")] == second
