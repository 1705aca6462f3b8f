"""Registered model versions as MLflow pyfunc models: registration through pipelines.train._register into a real local
store (idempotent across a kill before the run is tagged), `mlflow.pyfunc.load_model("models:/NAME/VERSION")` in a
fresh process with the code from the logged model, and a real `mlflow models serve` answering a POST with an MP4."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import pytest
import torch
import yaml

from models.schedules import ScheduleConfig
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
from models.vdit import VDiT, vdit_config
from training.export import save_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent
NAME = "reelforge-vdit-student"
FRAMES, SIZE, FPS = 4, 16, 4.0
PROMPT = "a blue circle moving left on a grey background"


def _decode(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny student exported into a train output and registered as pipelines.train does (twice: a rerun)."""
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.tracking import experiment_id
    from pipelines.train import _register
    from training.config import TrainConfig

    root = tmp_path_factory.mktemp("pyfunc")
    output = root / "train"
    torch.manual_seed(0)
    config = vdit_config("VDiT-T/2")
    save_model(output / "model", VDiT(config).state_dict(), config, FrozenTextEncoder(TextEncoderConfig()),
               ScheduleConfig(), {"preset": "VDiT-T/2", "sampling": {"num_steps": 2, "cfg_scale": 1.0},
                                  "curriculum": [{"name": "high", "steps": 1, "num_frames": FRAMES, "fps": FPS,
                                                  "size": SIZE}]})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(experiment_id(client, "reelforge-test", uri)).info.run_id
    train = load_config(TrainConfig, None, [f"tracking.registered_model={NAME}"], base={"output": str(output)})
    tags = {"data": "/data/curated@v3", "data_version": "v3-lance7-abc", "sampling_steps": 2}
    version = _register(client, run_id, train, tags, alias="steps-2")
    # a kill after create_model_version and before the run's tag: the rerun must find that version, not add one
    client.delete_tag(run_id, "reelforge.model_version")
    again = _register(client, run_id, train, tags, alias="steps-2")
    return {"uri": uri, "root": root, "client": client, "run_id": run_id, "versions": (version, again)}


def _env(uri: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # serve starts `uvicorn` by name: the environment's bin/ first, as in an activated virtualenv
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri, MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def test_registration_logs_a_pyfunc_model_once(registered, monkeypatch):
    client, run_id = registered["client"], registered["run_id"]
    assert registered["versions"] == ("1", "1")
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    version = versions[0]
    assert version.run_id == run_id and version.source.endswith("/model")
    assert version.tags["data_version"] == "v3-lance7-abc" and version.tags["data"] == "/data/curated@v3"
    assert version.tags["run_id"] == run_id
    assert str(client.get_model_version_by_alias(NAME, "steps-2").version) == "1"
    import mlflow.artifacts

    # models:/ URIs resolve through the registry of the environment's tracking URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registered["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(registered["root"] / "dl"),
                                                     tracking_uri=registered["uri"], registry_uri=registered["uri"]))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    inputs = {c["name"]: (c["type"], c.get("required", True)) for c in json.loads(mlmodel["signature"]["inputs"])}
    assert inputs["prompt"] == ("string", True)
    assert {k: inputs[k] for k in ("seed", "steps", "cfg")} == {"seed": ("long", False), "steps": ("long", False),
                                                                 "cfg": ("double", False)}
    outputs = [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])]
    assert outputs[:2] == ["video_mp4_base64", "num_frames"]
    assert mlmodel["metadata"]["reelforge.data_version"] == "v3-lance7-abc"
    assert mlmodel["metadata"]["reelforge.run_id"] == run_id
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"][0] == "prompt"
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("torch==") for r in requirements) and any(r.startswith("av==") for r in requirements)
    assert (local / "artifacts" / "model" / "config.json").is_file()
    assert (local / "code" / "models" / "vdit.py").is_file() and (local / "code" / "training" / "pyfunc.py").is_file()
    # `reelforge generate --model models:/...` (and evaluate, export-onnx) find the weights inside the pyfunc layout
    from pipelines.generate import GenerateConfig, resolve_model

    folder, _ = resolve_model(GenerateConfig(model=f"models:/{NAME}/1", out="x.mp4", tracking_uri=registered["uri"],
                                             cache_dir=str(registered["root"] / "cache")))
    assert folder.parts[-2:] == ("artifacts", "model") and (folder / "model.safetensors").is_file()


def test_pyfunc_loads_in_a_fresh_process_from_the_logged_code(registered, tmp_path):
    script = f"""
import base64, json, mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/{NAME}/1")
import training
out = model.predict(pd.DataFrame({{"prompt": ["{PROMPT}", "{PROMPT}"], "seed": [3, 4]}}))
print(json.dumps({{"training": training.__file__, "rows": out.drop(columns=["video_mp4_base64"]).to_dict("records"),
                  "videos": list(out["video_mp4_base64"])}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(registered["uri"]),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the package came from the model's own code/ folder, not from this checkout
    assert "/code/training/" in result["training"] and not result["training"].startswith(str(Path.cwd()))
    rows = result["rows"]
    assert [(r["seed"], r["steps"], r["cfg_scale"], r["num_frames"], r["width"], r["height"]) for r in rows] == [
        (3, 2, 1.0, FRAMES, SIZE, SIZE), (4, 2, 1.0, FRAMES, SIZE, SIZE)]
    first, second = (_decode(base64.b64decode(v)) for v in result["videos"])
    assert len(first) == FRAMES and first[0].shape == (SIZE, SIZE, 3)
    assert any((a != b).any() for a, b in zip(first, second, strict=True))  # other seed, other video


def test_mlflow_models_serve_answers_a_post_with_a_video(registered, tmp_path):
    from tests.test_mlflow_server import _free_port, _stop

    port = _free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(registered["uri"]), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=10) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                tail = (tmp_path / "serve.log").read_text()[-3000:]
                raise RuntimeError(f"mlflow models serve did not come up: {tail}")
            time.sleep(1)
        body = {"dataframe_records": [{"prompt": PROMPT, "seed": 7, "steps": 3, "cfg": 2.0}]}
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.load(response)
        (row,) = answer["predictions"]
        assert (row["seed"], row["steps"], row["cfg_scale"], row["sampler"]) == (7, 3, 2.0, "ddim")
        frames = _decode(base64.b64decode(row["video_mp4_base64"]))
        assert len(frames) == row["num_frames"] == FRAMES and frames[0].shape == (SIZE, SIZE, 3)
        bad = urllib.request.Request(f"{url}/invocations", data=json.dumps({"dataframe_records": [{"seed": 1}]})
                                     .encode(), method="POST", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400 and b"prompt" in refused.value.read()
    finally:
        _stop(proc)
        log.close()
