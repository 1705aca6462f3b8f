"""Every mistake a training config can hold stops `reelforge train` with exit code 2 and one line naming the key,
before Ray or MLflow start (checked in a fresh process: neither is even imported)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines.config import ConfigError, load_config
from training.config import TrainConfig

CASES = {
    "unknown preset": (["model.preset=VDiT-Q/2"], "model.preset"),
    "unknown override": (["model.overrides={depthh: 4}"], "model.overrides.depthh"),
    "zero checkpoint interval": (["checkpoint.every_steps=0"], "checkpoint.every_steps"),
    "zero log interval": (["tracking.log_every_steps=0"], "tracking.log_every_steps"),
    "size the patch does not divide": (["curriculum=[{name: odd, steps: 5, num_frames: 4, fps: 4.0, size: 15}]"],
                                       "curriculum[0] (odd): size 15"),
    "frames the temporal patch does not divide": (
        ["model.overrides={patch_frames: 2}", "curriculum=[{name: t, steps: 5, num_frames: 3, fps: 4.0, size: 16}]"],
        "curriculum[0] (t): num_frames 3"),
    "parameter offload without ZeRO-3": (["deepspeed.zero_stage=2", "deepspeed.offload_params=true"],
                                         "deepspeed.offload_params"),
    "optimizer offload without ZeRO": (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"],
                                       "deepspeed.offload_optimizer"),
    "unknown ZeRO stage": (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    "ZeRO stage in zero_options": (["deepspeed.zero_options={stage: 3}"], "deepspeed.zero_options: stage"),
    "unknown key": (["deepspeed.zero=2"], "deepspeed.zero"),
    "unknown codec": (["codec.kind=vae"], "codec.kind"),
    "text tower hub id without a commit": (["text.pretrained=hf-hub:org/some-clip"], "text.pretrained"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mistake_names_its_key(case):
    sets, key = CASES[case]
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_config(TrainConfig, None, sets, base={"data": "d", "output": "o"}).validate()


def test_reelforge_train_exits_2_with_one_line_before_ray_or_mlflow_start(tmp_path):
    script = f"""
import contextlib, io, json, sys
from pipelines.cli import main
cases = {json.dumps(CASES)}
results = {{}}
for name, (sets, key) in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--data", {str(tmp_path / "data")!r}, "--output", {str(tmp_path / "out")!r},
                     *[a for s in sets for a in ("--set", s)]])
    results[name] = [code, err.getvalue()]
print(json.dumps({{"results": results, "ray": "ray" in sys.modules, "mlflow": "mlflow" in sys.modules}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (code, err) in report["results"].items():
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("reelforge train: error:") and CASES[name][1] in lines[0], \
            (name, err)
    assert not report["ray"] and not report["mlflow"]
    assert not (tmp_path / "out").exists()


def test_zero_options_reach_deepspeeds_zero_section_beside_the_stage():
    from training.engine import deepspeed_config

    config = load_config(TrainConfig, None, ["deepspeed.zero_options={overlap_comm: true, reduce_bucket_size: 1000}"],
                         base={"data": "d", "output": "o"})
    config.validate()
    zero = deepspeed_config(config, world_size=2)["zero_optimization"]
    assert zero == {"overlap_comm": True, "reduce_bucket_size": 1000, "stage": config.deepspeed.zero_stage}
