"""A real `mlflow server` (SQLite store, artifacts proxied into a directory of its own): a curate run logs to it over
HTTP, and everything is read back through the REST API with plain HTTP, as a dashboard or another tool would; then the
UI's run comparison page is rendered by headless Chromium (skipped without one)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from curation.config import CurateConfig
from pipelines.config import flatten, load_config, to_dict
from pipelines.curate import run_curate

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = "reelforge-curate-server-test"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class MlflowServer:
    url: str
    root: Path  # the SQLite file and the artifacts destination live here
    proc: subprocess.Popen

    def download(self, endpoint: str, **params) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{endpoint}{query}", timeout=60) as response:
            return response.read()

    def get(self, endpoint: str, **params) -> dict:
        return json.loads(self.download(endpoint, **params))

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{endpoint}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """The server and everything it spawned (uvicorn workers), SIGTERM then SIGKILL."""
    try:
        processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in processes:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, processes = psutil.wait_procs(processes, timeout=10)
        if not processes:
            break
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The job runner (7 huey consumers for GenAI jobs) and telemetry are of no use here and cost a 2-core runner.
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", root, proc)
    try:
        deadline = time.time() + 240
        while True:
            try:
                if server.download("/health") == b"OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        _stop(proc)
        log.close()


def _curate_config(root: Path, out: Path, url: str, *sets: str) -> CurateConfig:
    overrides = ["output_files.commit_videos=4", f"tracking.experiment={EXPERIMENT}", *sets]
    config = load_config(CurateConfig, None, overrides, base={"input": str(root), "output": str(out)})
    config.tracking.uri = url
    return config


@pytest.fixture(scope="module")
def curated_on_server(mlflow_server, sample_dump, ray_cluster, tmp_path_factory):
    root, _ = sample_dump
    out = tmp_path_factory.mktemp("curated-server")
    config = _curate_config(root, out, mlflow_server.url)
    record = run_curate(config)
    return config, record, out


def test_curate_run_reads_back_over_the_rest_api(mlflow_server, curated_on_server, sample_dump):
    from curation.dataset import CuratedDataset

    config, record, out = curated_on_server
    _, truth = sample_dump
    counts = record["counts"]
    run_id = record["run"]["mlflow_run_id"]
    assert record["run"]["tracking_uri"] == mlflow_server.url and record["run"]["experiment"] == EXPERIMENT
    assert CuratedDataset(str(out)).record(1)["run"]["mlflow_run_id"] == run_id  # the version names its run

    experiment = mlflow_server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    # The server chose where artifacts go (reelforge leaves a server's experiments to it): its proxy.
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")
    runs = mlflow_server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})
    assert [r["info"]["run_id"] for r in runs["runs"]] == [run_id]

    run = mlflow_server.get("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    info, data = run["info"], run["data"]
    assert info["status"] == "FINISHED" and info["run_name"] == f"curate-{out.name}-v0001"
    assert info["experiment_id"] == experiment["experiment_id"]
    # Params: the resolved config, flattened, every key with its value as MLflow stores it.
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params == {key: str(value) for key, value in flatten(config).items()}
    assert params["output"] == str(out) and params["output_files.commit_videos"] == "4"
    # Metrics: the version record's counts.
    metrics = {m["key"]: m["value"] for m in data["metrics"]}
    assert metrics["videos_read"] == counts["videos"] == len(truth["videos"]) + len(truth["bad_files"])
    assert metrics["videos_ok"] == counts["videos_ok"] == len(truth["videos"])
    assert metrics["videos_quarantined"] == sum(counts["quarantined"].values()) == len(truth["bad_files"])
    assert metrics["clips_found"] == counts["clips"] and metrics["clips_kept"] == counts["clips_kept"] > 0
    assert metrics["clips_dropped"] == counts["clips_dropped"]
    assert {k: v for k, v in metrics.items() if k.startswith("quarantined.")} == {
        f"quarantined.{reason}": n for reason, n in counts["quarantined"].items()}
    assert metrics["video_seconds_per_wall_second"] > 0
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["dataset_version"] == "1" and tags["output_uri"] == str(out) and tags["scores_untrained"] == "true"
    history = mlflow_server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="clips_kept")
    assert [(m["value"], m["step"]) for m in history["metrics"]] == [(counts["clips_kept"], 0)]

    # Artifacts: listed, downloaded through both of the server's endpoints, and stored where the server put them.
    listed = mlflow_server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id)
    assert {"config.yaml", "report"} <= {f["path"] for f in listed["files"]}
    report = mlflow_server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="report")["files"]
    sizes = {f["path"]: int(f["file_size"]) for f in report if not f["is_dir"]}
    assert {"report/histograms.png", "report/contact_sheet.png", "report/drop_reasons.md"} <= set(sizes)
    png = mlflow_server.download("/get-artifact", path="report/histograms.png", run_uuid=run_id)
    assert png.startswith(PNG_SIGNATURE) and len(png) == sizes["report/histograms.png"]
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert image.format == "PNG" and min(image.size) >= 200
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)  # None: more than that
        assert colors is None or len(colors) > 10  # drawn, not blank
    # The same bytes as the report that travels with the dataset.
    assert png == (out / "reports" / "v0001" / "histograms.png").read_bytes()
    proxied = info["artifact_uri"].removeprefix("mlflow-artifacts:/")
    drop_reasons = mlflow_server.download(f"/api/2.0/mlflow-artifacts/artifacts/{proxied}/report/drop_reasons.md")
    assert drop_reasons == (out / "reports" / "v0001" / "drop_reasons.md").read_bytes()
    assert (mlflow_server.root / "artifacts" / proxied / "report" / "histograms.png").read_bytes() == png
    logged_config = mlflow_server.download("/get-artifact", path="config.yaml", run_uuid=run_id)
    assert yaml.safe_load(logged_config) == to_dict(config)
    # A wrong run id is an error the API names, not an empty answer.
    with pytest.raises(urllib.error.HTTPError) as missing:
        mlflow_server.get("/api/2.0/mlflow/runs/get", run_id="0" * 32)
    assert missing.value.code == 404


def _screenshot_script():
    spec = importlib.util.spec_from_file_location("mlflow_screenshot", ROOT / "scripts" / "mlflow_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ui_compares_two_curate_runs_in_headless_chromium(mlflow_server, curated_on_server, sample_dump, tmp_path):
    script = _screenshot_script()
    if script.find_chromium() is None:
        pytest.skip("no Chromium executable (apt-get install chromium, or set REELFORGE_CHROMIUM)")
    root, _ = sample_dump
    _, record, _ = curated_on_server
    # A second curation of the same dump with a stricter motion filter: the runs differ in one param and the counts.
    strict = run_curate(_curate_config(root, tmp_path / "strict-motion", mlflow_server.url, "filters.motion.min=20"))
    run_ids = [record["run"]["mlflow_run_id"], strict["run"]["mlflow_run_id"]]
    assert strict["counts"]["clips_kept"] < record["counts"]["clips_kept"]
    experiment = mlflow_server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    url = script.compare_runs_url(mlflow_server.url, [experiment["experiment_id"]], run_ids)

    # What the page shows, as text: both runs, and the params table row that tells them apart, in run order.
    dom = script.page_dom(url)
    (tmp_path / "compare.html").write_text(dom)  # for a look when this fails
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert "Comparing 2 Runs from 1 Experiment" in text, text[-3000:]
    assert all(run_id in dom for run_id in run_ids)
    assert "filters.motion.min 0.5 20.0 " in text

    output = tmp_path / "compare.png"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "mlflow_screenshot.py"), mlflow_server.url,
                             "--experiment", experiment["experiment_id"], "--runs", *run_ids,
                             "--output", str(output), "--width", "1400", "--height", "1800"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.read_bytes().startswith(PNG_SIGNATURE)
    from PIL import Image, ImageStat

    with Image.open(output) as image:
        assert image.size == (1400, 1800)
        grey = image.convert("L")
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50, "a near-blank page"
    assert ImageStat.Stat(grey).stddev[0] > 10, "a near-uniform page"
