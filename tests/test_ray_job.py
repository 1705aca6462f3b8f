"""The Ray job path as users run it: `ray start --head` with a dashboard, `ray job submit --working-dir .` of the
workflow's curate step, its logs and outputs; then only that head node is stopped, and other clusters keep running."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # `ray` and `reelforge` of the environment running the tests
# Ray 2.60 leaves .git, .venv, venv and __pycache__ out of a working_dir and honours .gitignore (runs/, caches); naming
# them keeps the upload small with older Rays, RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES or
# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1.
EXCLUDES = [".git", ".venv", "/runs", "/data", "/mlruns", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class HeadNode:
    """A head node of its own: its own temp dir (so it is neither found by `ray.init()` through
    /tmp/ray/ray_current_cluster nor mistaken for anyone else's), its own ports, its own session id."""

    temp_dir: str
    env: dict[str, str]
    gcs_port: int
    dashboard_port: int
    session_id: int = 0
    ray_start_output: str = ""
    stopped: list[int] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    @classmethod
    def start(cls) -> HeadNode:
        # Short: Ray's Unix sockets live under it, and socket paths are limited to 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="rf-ray-")
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI")}
        # The job's entrypoint finds `reelforge` on the PATH of the raylet that spawns it: this environment's.
        env.update(RAY_TMPDIR=temp_dir, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
        # Token auth, which Ray 2.60 turns on by default, with a token of this cluster's own rather than whatever
        # ~/.ray/auth_token holds (or does not, on a fresh CI machine); `ray job` commands read it from the env.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = (
            _free_ports(9))
        head = cls(temp_dir, env, gcs, dashboard)
        # Every port named: the defaults (10001 for the client server, 52365 for the dashboard agent) may be held by
        # another cluster of this machine, and a job cannot be submitted through an agent that lost its port.
        command = [
            str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
            f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--object-store-memory={300 * 1024**2}", "--disable-usage-stats",
        ]
        # A session of its own: every daemon `ray start` leaves behind inherits its session id, which is how
        # stop() finds this cluster's processes and no one else's (`ray stop` would kill every Ray of the user).
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        head.session_id = proc.pid
        try:
            head.ray_start_output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            head.stop()
            raise
        if proc.returncode != 0:
            head.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{head.ray_start_output[-4000:]}")
        deadline = time.time() + 180
        while True:
            try:
                request = urllib.request.Request(f"{head.dashboard_url}/api/version", headers=head.auth_headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                head.stop()
                raise RuntimeError(f"the dashboard at {head.dashboard_url} did not answer in 180 s")
            time.sleep(1)
        return head

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those of its session, those whose environment or command line names its temp
        dir, and their descendants (the job's driver runs in a session of its own, under the job supervisor)."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                mine = os.getsid(proc.pid) == self.session_id or self.temp_dir in " ".join(proc.cmdline())
                if not mine:
                    mine = proc.environ().get("RAY_TMPDIR") == self.temp_dir
            except (psutil.Error, OSError):
                continue
            if mine:
                found[proc.pid] = proc
        for proc in list(found.values()):
            try:
                found.update((child.pid, child) for child in proc.children(recursive=True))
            except psutil.Error:
                pass
        return list(found.values())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period, to this cluster's processes only (what `ray stop` does to all
        of them); the temp dir goes too."""
        processes = self.processes()
        self.stopped.extend(p.pid for p in processes)
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            for proc in processes:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            _, processes = psutil.wait_procs(processes, timeout=grace)
            if not processes:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def head_node(ray_cluster):
    """Started after pytest's own local cluster (ray_cluster), so stopping it shows the other one survives."""
    head = HeadNode.start()
    yield head
    head.stop()


def _ray(head: HeadNode, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=head.env, capture_output=True, text=True,
                          timeout=timeout)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # the CLI's colours


def test_ray_job_submit_runs_the_curate_step_and_stopping_leaves_other_clusters(head_node, ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    workdir = tmp_path / "wd"
    submission_id = f"reelforge-test-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    submitted = _ray(
        head_node, "job", "submit", "--address", head_node.dashboard_url, "--submission-id", submission_id,
        "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", "reelforge", "run", "--config", "configs/quickstart.yaml", "--workdir", str(workdir),
        "--set", "steps=[curate]", "--set", "sample_dump.num_videos=60",
        "--set", "curate.output_files.commit_videos=8",
        timeout=480,
    )
    job_seconds = time.perf_counter() - started
    assert submitted.returncode == 0, f"ray job submit: {submitted.stdout[-6000:]}\n{submitted.stderr[-3000:]}"
    assert f"Job '{submission_id}' succeeded" in _plain(submitted.stdout)

    client = JobSubmissionClient(head_node.dashboard_url, headers=head_node.auth_headers)
    info = client.get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED, info.message
    assert info.entrypoint.startswith("reelforge run --config configs/quickstart.yaml")
    package = info.runtime_env["working_dir"]
    assert package.startswith("gcs://_ray_pkg_"), info.runtime_env
    status = _ray(head_node, "job", "status", "--address", head_node.dashboard_url, submission_id)
    assert status.returncode == 0 and f"Job '{submission_id}' succeeded" in _plain(status.stdout), status.stdout

    # What was shipped: the code and configs, not the virtualenv or the git history.
    unpacked = next(Path(head_node.temp_dir).glob(
        f"session_*/runtime_resources/working_dir_files/{package.removeprefix('gcs://').removesuffix('.zip')}"))
    assert (unpacked / "pipelines" / "cli.py").is_file() and (unpacked / "configs" / "quickstart.yaml").is_file()
    assert not (unpacked / ".venv").exists() and not (unpacked / ".git").exists()
    shipped = sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file())
    assert shipped < 20 * 1024**2, f"{shipped / 1024**2:.1f} MiB shipped"

    # The outputs, against the truth of the sample dump the workflow generated.
    dump = workdir / "sample-dump"
    truth = json.loads((dump / "sample_truth.json").read_text())
    from curation.dataset import CuratedDataset

    dataset = CuratedDataset(str(workdir / "curated"))
    record = dataset.record()
    counts = record["counts"]
    assert record["dataset_version"] == 1 and dataset.latest() == 1
    assert counts["videos"] == len(truth["videos"]) + len(truth["bad_files"])
    assert counts["videos_ok"] == len(truth["videos"])
    assert sum(counts["quarantined"].values()) == len(truth["bad_files"])
    tables = {kind: dataset.read(kind).to_pylist() for kind in ("videos", "clips", "shards")}
    videos = {row["uri"].removeprefix(f"{dump}/"): row for row in tables["videos"]}
    assert set(videos) == set(truth["videos"]) | set(truth["bad_files"])
    for name, video in truth["videos"].items():
        assert videos[name]["status"] == "ok" and len(videos[name]["cut_frames"]) == len(video["cuts"]), name
    assert all(videos[name]["status"] == "quarantined" for name in truth["bad_files"])
    ok_ids = {row["video_id"] for row in tables["videos"] if row["status"] == "ok"}
    assert {clip["video_id"] for clip in tables["clips"]} == ok_ids  # every good video gives clips, no other does
    kept = [clip for clip in tables["clips"] if clip["kept"]]
    assert len(tables["clips"]) == counts["clips"] and len(kept) == counts["clips_kept"] == len(tables["shards"]) > 0
    # The job's --set reached the curate step: its videos were committed 8 at a time (what a kill can lose; the
    # batching itself is checked by test_curate_ray's kill -9 test, since the commits between tags are removed once
    # the version is tagged).
    assert record["config"]["output_files"]["commit_videos"] == 8
    # The job ran in the workflow's MLflow store (the default beside the workdir), not in one of the test's.
    assert record["run"]["tracking_uri"] == f"sqlite:///{workdir / 'mlflow.db'}"
    assert (workdir / "mlflow.db").is_file()

    # The job's own logs: what the curate step found and processed, the workflow's closing summary, and a driver
    # that joined this cluster rather than starting one of its own.
    logs = _ray(head_node, "job", "logs", "--address", head_node.dashboard_url, submission_id)
    assert logs.returncode == 0, logs.stderr
    text = _plain(logs.stdout)
    state = json.loads((workdir / "workflow.json").read_text())
    assert state["steps"]["curate"]["summary"]["dataset_version"] == 1
    for line in (f"found {counts['videos']} video files under {dump}", f"{counts['videos']} new videos to process",
                 "== curate", f"videos read: {counts['videos']} (", "clips kept:",  # the curate summary
                 "steps run: curate;", f"workdir: {workdir}", state["run_id"]):
        assert line in text, (line, text[-4000:])
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{head_node.gcs_port}\b", text), text[-4000:]

    # Stopping it takes this cluster's processes only: pytest's own cluster (and anyone else's) keeps working.
    assert not ray_cluster.get_runtime_context().gcs_address.endswith(f":{head_node.gcs_port}")
    head_node.stop()
    assert head_node.processes() == [] and len(head_node.stopped) >= 5
    # A task of an importable function (this test module is not importable on Ray's workers).
    assert ray_cluster.get(ray_cluster.remote(json.dumps).remote([42]), timeout=120) == "[42]"
    print(f"ray job submit took {job_seconds:.0f} s")
