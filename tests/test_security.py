"""Issue 13, items 10 and 11: no credential reaches an output, a log line or the MLflow store; weights load only
pinned and tensors-only; a YAML config with a Python tag is refused in one line.

The secret-carrying runs are real: a curate run on Ray, the train, distill and evaluate steps up to the point where
everything they write about their config is written, a workflow, each into a real SQLite MLflow store. Their
`tracking.uri` is a PostgreSQL URI with a password that nothing connects to: the store each step resolves is swapped
for the SQLite one (where a run logs is not what is under test; what it writes is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import string
from pathlib import Path

import pytest
from output_scan import output_contents

from curation.redact import redact_config, redact_uri
from pipelines import tracking
from pipelines.config import ConfigError, load_config

PASSWORD = "pw-Zq81xPw7"
SECRET_KEY = "sk-Wd93LmQ2"
ACCESS_KEY = "AKIAEXAMPLE7QX3"
TOKEN = "tk-Hy62RnB5"
SECRETS = (PASSWORD, SECRET_KEY, ACCESS_KEY, TOKEN)
SECRET_TRACKING = f"postgresql://mlflow:{PASSWORD}@db.invalid:5432/mlflow?sslmode=require&token={TOKEN}"


def _leaks(text: str | bytes) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode()
    return [s for s in SECRETS if s.encode() in data]


def _files_leaking(root: Path) -> dict[str, list[str]]:
    """Every regular file under root (the MLflow database and artifacts too) whose bytes hold a secret, and every
    place in a Lance dataset under root (a column of some version, its config, a tag's metadata) whose value does."""
    found: dict[str, set[str]] = {}
    for where, data in output_contents(root):
        found.setdefault(where, set()).update(_leaks(data))
    return {where: sorted(secrets) for where, secrets in found.items() if secrets}


def _store_leaks(uri: str) -> dict[str, list[str]]:
    """Every param, tag and run name in the store that holds a secret."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
                for key, value in values.items():
                    if _leaks(f"{key}={value}"):
                        found[f"{run.info.run_name} {kind} {key}"] = _leaks(value)
            if _leaks(run.info.run_name or ""):
                found[f"{run.info.run_id} name"] = _leaks(run.info.run_name)
    return found


@pytest.fixture
def no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def secret_store_unreached(monkeypatch, no_env_store):
    """tracking.uri = SECRET_TRACKING on the config; the store actually used is the SQLite default."""
    real = tracking.tracking_uri

    def resolve(configured, default_dir):
        return real(None if configured == SECRET_TRACKING else configured, default_dir)

    monkeypatch.setattr(tracking, "tracking_uri", resolve)
    return resolve


# ---------------------------------------------------------------------------------------------------------------------
# The scrubber


@pytest.mark.parametrize(("uri", "expected"), [
    (f"postgresql://u:{PASSWORD}@host:5432/db", "postgresql://u:***@host:5432/db"),
    (f"s3://{ACCESS_KEY}:{SECRET_KEY}/x@bucket/videos", "s3://" + ACCESS_KEY + ":***@bucket/videos"),
    (f"s3://b/v?access_key={ACCESS_KEY}&secret_key={SECRET_KEY}&region=eu-1&endpoint_override=http://127.0.0.1:9000",
     "s3://b/v?access_key=***&secret_key=***&region=eu-1&endpoint_override=http://127.0.0.1:9000"),
    (f"https://mlflow.example.com/?token={TOKEN}", "https://mlflow.example.com/?token=***"),
    (f"https://acct.blob.core.windows.net/c?sv=2022&sig={TOKEN}&se=1",
     "https://acct.blob.core.windows.net/c?sv=2022&sig=***&se=1"),
    (f"https://b.s3.amazonaws.com/k?X-Amz-Credential={ACCESS_KEY}&X-Amz-Signature={TOKEN}",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("sqlite:////tmp/run/mlflow.db", "sqlite:////tmp/run/mlflow.db"),
    ("http://mlflow.internal:5000/#/experiments/1", "http://mlflow.internal:5000/#/experiments/1"),
    ("file:///data/dump", "file:///data/dump"),
    (f"could not reach postgresql://u:{PASSWORD}@db/x: timeout", "could not reach postgresql://u:***@db/x: timeout"),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_config_masks_every_string_and_secret_named_keys_without_changing_the_config():
    from curation.config import CurateConfig

    config = CurateConfig(input=f"s3://bucket/dump?secret_key={SECRET_KEY}", output="/out")
    config.tracking.uri = SECRET_TRACKING
    data = redact_config(config)
    assert not _leaks(json.dumps(data)) and data["output"] == "/out"
    assert data["tracking"]["uri"] == "postgresql://mlflow:***@db.invalid:5432/mlflow?sslmode=require&token=***"
    assert config.tracking.uri == SECRET_TRACKING  # the config still connects with the real URI
    assert redact_config({"db": {"password": PASSWORD, "api_token": TOKEN, "tokens_used": 3}, "xs": ("a", TOKEN)}) == {
        "db": {"password": "***", "api_token": "***", "tokens_used": 3}, "xs": ("a", TOKEN)}


def test_the_output_scan_finds_a_secret_inside_lance_tables_their_configs_and_tags(tmp_path):
    """Lance compresses the strings of its data files: the scan reads the values back, every version of them."""
    import lance
    import pyarrow as pa

    rng = random.Random(0)
    uris = ["/dump/" + "".join(rng.choices(string.ascii_letters, k=60)) + ".mp4" for _ in range(500)]
    uris[7] = f"s3://{ACCESS_KEY}:x@bucket/a.mp4"  # FSST-compressed: not in the data file as bytes
    table = lance.write_dataset(pa.table({"uri": uris, "n": list(range(500))}), tmp_path / "videos.lance")
    table.delete("n = 7")  # gone from the newest version, still in the first one
    table = lance.dataset(tmp_path / "videos.lance")
    table.update_config({"reelforge.mlflow_run.v0001": f"https://mlflow/?token={TOKEN}"})
    table.tags.create("v0001", table.version)
    table.tags.replace_metadata("v0001", {"reelforge.version": json.dumps({"config": {"db": PASSWORD}})})
    found = _files_leaking(tmp_path)
    assert found.get("videos.lance @1 uri") == [ACCESS_KEY] and "videos.lance @2 uri" not in found
    assert any(where.startswith("videos.lance @3 config") for where in found) and TOKEN in sum(found.values(), [])
    assert found.get("videos.lance tag v0001 metadata") == [PASSWORD]


# ---------------------------------------------------------------------------------------------------------------------
# Every writing point, in real runs


def test_tracking_scrubs_params_tags_and_run_names(tmp_path, no_env_store, caplog):
    from curation.config import CurateConfig
    from pipelines.config import flatten

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = CurateConfig(input=f"s3://b/d?access_key={ACCESS_KEY}&secret_key={SECRET_KEY}", output="/o")
    config.tracking.uri = SECRET_TRACKING
    with caplog.at_level(logging.INFO):
        run_id = tracking.open_run(uri, "e", "a-run-of-another-store", run_name=f"out?token={TOKEN}",
                                   tags={"reelforge.data": f"s3://user:{SECRET_KEY}@b/x"})
        client = tracking.client_for(uri)
        tracking.log_params(client, run_id, flatten(config))
        tracking.log_params(client, run_id, flatten(config))  # a resumed run logs the same (scrubbed) values again
    assert _store_leaks(uri) == {}
    run = client.get_run(run_id)
    assert run.data.params["tracking.uri"] == redact_uri(SECRET_TRACKING)
    assert run.data.params["input"] == "s3://b/d?access_key=***&secret_key=***"
    assert run.data.tags["reelforge.data"] == "s3://user:***@b/x" and run.info.run_name == "out?token=***"
    assert not _leaks(caplog.text)


@pytest.mark.slow
@pytest.mark.ray
def test_curate_run_with_secret_uris_writes_no_secret(tmp_path, ray_cluster, monkeypatch, no_env_store, caplog):
    """A real curation: input given as a file:// URI with S3-style keys in its query, tracking.uri with a password;
    not one byte of any output file, the MLflow database, its artifacts, params, tags or the log holds them."""
    from curation.config import CurateConfig
    from curation.dataset import CuratedDataset
    from curation.sample_dump import make_sample_dump
    from pipelines import curate

    dump = tmp_path / "dump"
    make_sample_dump(dump, num_videos=6, seed=3, include_bad_files=False)
    out = tmp_path / "curated"
    config = load_config(CurateConfig, None, [], base={
        "input": f"{dump.as_uri()}?access_key={ACCESS_KEY}&secret_key={SECRET_KEY}", "output": str(out)})
    config.tracking.uri = SECRET_TRACKING
    monkeypatch.setattr(curate, "curate_tracking_uri", lambda c, o: tracking.tracking_uri(None, out))
    with caplog.at_level(logging.INFO):
        record = curate.run_curate(config)
    assert record["counts"]["videos_ok"] >= 1  # the URI with its options was read
    # The tables (every Lance version, config and tag, whose record holds the config), config-v0001.yaml, the
    # report, mlflow.db and its artifacts.
    assert _files_leaking(out) == {}
    uri = tracking.tracking_uri(None, out)
    assert _store_leaks(uri) == {}
    assert record["config"]["tracking"]["uri"] == redact_uri(SECRET_TRACKING)
    assert CuratedDataset(str(out)).record(1)["config"]["tracking"]["uri"] == redact_uri(SECRET_TRACKING)
    # The tables hold the input's URIs as logs show them, which the scan above read.
    video_uris = CuratedDataset(str(out)).read("videos", columns=["uri"])["uri"].to_pylist()
    assert video_uris and all(u.endswith("access_key=***&secret_key=***") for u in video_uris)
    assert "secret_key=***" in (out / "config-v0001.yaml").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = record["run"]["mlflow_run_id"]
    assert client.get_run(run_id).data.tags["input_uri"].endswith("access_key=***&secret_key=***")
    assert not _leaks(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    assert not _leaks(caplog.text) and not _leaks(curate.summary_text(record))


class _Stop(Exception):
    """Raised where a step would start its heavy work: everything it writes about its config is written by then."""


def _stop(*args, **kwargs):
    raise _Stop


def _tiny_export(directory: Path) -> str:
    import torch

    from models.schedules import ScheduleConfig
    from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
    from models.vdit import VDiT, vdit_config
    from training.export import save_model

    torch.manual_seed(0)
    config = vdit_config("VDiT-T/2")
    curriculum = [{"name": "only", "steps": 2, "num_frames": 4, "fps": 4.0, "size": 16}]
    save_model(directory, VDiT(config).state_dict(), config, FrozenTextEncoder(TextEncoderConfig()), ScheduleConfig(),
               {"preset": "VDiT-T/2", "steps": 2, "curriculum": curriculum, "ema_decay": 0.995, "weights": "ema",
                "sampling": {"num_steps": 2, "cfg_scale": 1.0}})
    return str(directory)


def test_train_and_distill_write_no_secret(tmp_path, monkeypatch, secret_store_unreached, caplog):
    """train-config.yaml / distill-config.yaml, their params and tags (reelforge.data, reelforge.output) and logs,
    up to where the trainer would start."""
    from pipelines import distill, train
    from training.config import TrainConfig
    from training.distill import DistillConfig

    data = tmp_path / "curated"  # never read: the dataset is not what is under test
    data.mkdir()
    monkeypatch.setattr("training.dataset.ClipTable.open", classmethod(lambda cls, uri: _Table(uri)))
    monkeypatch.setattr("pipelines.cluster.init_ray", lambda config: None)
    monkeypatch.setattr(train, "_trainer", _stop)
    config = TrainConfig(data=str(data), output=str(tmp_path / "train"))
    config.tracking.uri = SECRET_TRACKING
    with caplog.at_level(logging.INFO), pytest.raises(_Stop):
        train.run_train(config)
    assert config.tracking.uri == SECRET_TRACKING  # kept for connecting
    assert "token=***" in (tmp_path / "train" / "train-config.yaml").read_text()

    teacher = _tiny_export(tmp_path / "teacher")
    monkeypatch.setattr(distill, "round_train_config", _stop)
    dconfig = DistillConfig(teacher=teacher, data=str(data), output=str(tmp_path / "distill"))
    dconfig.tracking.uri = SECRET_TRACKING
    with caplog.at_level(logging.INFO), pytest.raises(_Stop):
        distill.run_distill(dconfig)
    assert "token=***" in (tmp_path / "distill" / "distill-config.yaml").read_text()
    assert _files_leaking(tmp_path) == {}
    assert _store_leaks(tracking.tracking_uri(None, tmp_path / "train")) == {}
    assert _store_leaks(tracking.tracking_uri(None, tmp_path / "distill")) == {}
    assert not _leaks(caplog.text)


class _Table:
    version, number, lance_version = "v1-lance1-test", 1, 1

    def __init__(self, uri: str):
        self.data_uri = f"{uri}@v1"

    def __len__(self) -> int:
        return 0


def test_evaluate_writes_no_secret(tmp_path, secret_store_unreached, caplog):
    from pipelines.evaluate import run_evaluate, summary_text
    from training.evaluate import EvaluateConfig

    model = _tiny_export(tmp_path / "model")
    config = load_config(EvaluateConfig, None, [f"models=[{{path: {model}}}]", "max_videos=2", "grid_prompts=1",
                                                f"tracking.uri={SECRET_TRACKING}"],
                         base={"output": str(tmp_path / "evaluate")})
    with caplog.at_level(logging.INFO):
        summary = run_evaluate(config)
    assert summary["tracking_uri"].startswith("sqlite:")
    assert "token=***" in (tmp_path / "evaluate" / "evaluate-config.yaml").read_text()
    assert _files_leaking(tmp_path) == {}  # evaluate-config.yaml, results.json, mlflow.db and its artifacts
    assert _store_leaks(summary["tracking_uri"]) == {}
    assert not _leaks(caplog.text) and not _leaks(summary_text({**summary, "tracking_uri": SECRET_TRACKING}))


def test_workflow_json_and_params_hold_no_secret(tmp_path, secret_store_unreached, caplog):
    from pipelines.workflow import WorkflowConfig, _State, run_workflow, summary_text

    config = WorkflowConfig(workdir=str(tmp_path / "wf"), steps=[],
                            input=f"s3://bucket/dump?access_key={ACCESS_KEY}&secret_key={SECRET_KEY}")
    config.tracking_uri = SECRET_TRACKING
    with caplog.at_level(logging.INFO):
        results = run_workflow(config)
    state = _State(tmp_path / "wf")  # a step's summary carries its store's URI, as train and distill return it
    state.update("train", hash="h", status="finished", summary={"tracking_uri": SECRET_TRACKING,
                                                                  "text": f"MLflow run r in {SECRET_TRACKING}"})
    assert _files_leaking(tmp_path) == {}
    assert json.loads((tmp_path / "wf" / "workflow.json").read_text())["steps"]["train"]["summary"][
        "tracking_uri"] == redact_uri(SECRET_TRACKING)
    assert _store_leaks(results["tracking_uri"]) == {}
    assert not _leaks(caplog.text) and not _leaks(summary_text({**results, "tracking_uri": SECRET_TRACKING}))


# ---------------------------------------------------------------------------------------------------------------------
# Loads


def test_a_yaml_config_with_a_python_tag_is_refused_in_one_line(tmp_path):
    from curation.config import CurateConfig

    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"input: /dump\noutput: !!python/object/apply:os.system [\"touch {marker}\"]\n")
    with pytest.raises(ConfigError) as info:
        load_config(CurateConfig, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "line 2" in message and "python/object" in message
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r"^--set .*line 1.*not allowed"):
        load_config(CurateConfig, None, ["input=!!python/name:os.system"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("input: [a,\noutput: b\n")
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(broken))}: line \d+"):
        load_config(CurateConfig, broken)


def test_no_torch_load_without_weights_only():
    """Every torch.load in the project passes weights_only=True (torch < 2.6 unpickles anything by default)."""
    root = Path(__file__).resolve().parents[1]
    calls = []
    for path in root.glob("*/**/*.py"):
        if path.parts[len(root.parts)] in {".venv", "tests", "build"}:
            continue
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((str(path.relative_to(root)), text[match.start():end + 1]))
    assert calls, "the scan found no torch.load at all"
    assert [c for c in calls if "weights_only=True" not in c[1]] == []


def test_the_i3d_file_needs_its_sha256(tmp_path):
    from training.evaluate import EvaluateConfig

    base = [f"models=[{{path: {tmp_path}}}]", f"metrics.i3d_path={tmp_path / 'i3d_torchscript.pt'}"]
    with pytest.raises(ConfigError, match=r"^metrics\.i3d_sha256: required with metrics\.i3d_path"):
        load_config(EvaluateConfig, None, base).validate()
    with pytest.raises(ConfigError, match=r"^metrics\.i3d_sha256: expected 64 hex digits"):
        load_config(EvaluateConfig, None, [*base, "metrics.i3d_sha256=abc"]).validate()
    load_config(EvaluateConfig, None, [*base, f"metrics.i3d_sha256={'a' * 64}"]).validate()


def test_hub_ids_need_a_pinned_commit(tmp_path):
    from curation.config import CurateConfig
    from models.clip_scorer import PRESETS, WeightsError, load_open_clip
    from pipelines.curate import check_weights
    from training.evaluate import EvaluateConfig

    for name in ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K@main"):
        with pytest.raises(WeightsError, match="is not pinned: name the commit"):
            load_open_clip(name, None, PRESETS, device="cpu")
        with pytest.raises(WeightsError, match="is not pinned"):
            load_open_clip("ViT-B-32", name, PRESETS, device="cpu")
    config = CurateConfig()
    config.clip_scores.pretrained = "hf-hub:org/repo"
    with pytest.raises(ConfigError, match=r"^clip_scores: hf-hub:org/repo is not pinned"):
        check_weights(config)
    with pytest.raises(ConfigError, match=r"^metrics\.clip: hf-hub:org/repo is not pinned"):
        load_config(EvaluateConfig, None, [f"models=[{{path: {tmp_path}}}]",
                                           "metrics.clip.model_name=hf-hub:org/repo"]).validate()


def _tiny_clip_weights(path: Path) -> str:
    import torch
    from safetensors.torch import save_file

    from models.clip_scorer import PRESETS, load_open_clip

    model = load_open_clip("tiny", None, PRESETS, device="cpu").model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # not the seeded random init, so a load that ignored the file would show
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_pinned_hub_id_loads_its_commit_from_the_hub_cache(tmp_path, monkeypatch):
    """hf-hub:org/repo@<commit> is fetched through huggingface_hub at exactly that commit (here from a prepared
    cache, offline) and loads the weights found there."""
    import huggingface_hub.constants
    import torch

    from models.clip_scorer import CONFIG_DIR, PRESETS, load_open_clip

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--reelforge--tiny-clip" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    model_cfg = json.loads((CONFIG_DIR / "reelforge-tiny-clip.json").read_text())
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    _tiny_clip_weights(snapshot / "open_clip_model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_open_clip(f"hf-hub:reelforge/tiny-clip@{commit}", None, PRESETS, device="cpu",
                            cache_dir=str(tmp_path / "hub"))
    random = load_open_clip("tiny", None, PRESETS, device="cpu")
    assert not loaded.untrained and loaded.label == f"hf-hub:reelforge/tiny-clip@{commit}"
    first = next(iter(loaded.model.state_dict()))
    assert torch.allclose(loaded.model.state_dict()[first], random.model.state_dict()[first] + 0.01)


def test_a_checkpoint_file_is_checked_against_its_sha256(tmp_path):
    from curation.config import CurateConfig
    from models.captioner import CocaCaptioner
    from models.clip_scorer import ClipScorer, WeightsError
    from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
    from pipelines.curate import check_weights

    path = tmp_path / "tiny.safetensors"
    digest = _tiny_clip_weights(path)
    wrong = "0" * 64
    assert not ClipScorer("tiny", str(path), "cpu", sha256=digest.upper()).untrained
    with pytest.raises(WeightsError, match=f"sha256 mismatch: expected {wrong}, got {digest}"):
        ClipScorer("tiny", str(path), "cpu", sha256=wrong)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        FrozenTextEncoder(TextEncoderConfig(pretrained=str(path), pretrained_sha256=wrong))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        CocaCaptioner("tiny", str(path), device="cpu", sha256=wrong)
    with pytest.raises(WeightsError, match="not a local checkpoint file"):
        ClipScorer("tiny", None, "cpu", sha256=digest)
    config = CurateConfig()
    config.captions.pretrained, config.captions.pretrained_sha256 = str(path), wrong
    with pytest.raises(ConfigError, match=r"^captions\.pretrained_sha256: .*sha256 mismatch"):
        check_weights(config)
    config.captions.pretrained_sha256 = digest
    check_weights(config)
