"""bench/train_gpu.py on the CPU: both paths measured, FLOPs as an independent count gives them, the plain path
without DeepSpeed or the project's training packages, and the shipped shapes equal to configs/train/vdit-s.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.vdit import VDiT, vdit_config

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "train_gpu.py"
QUICK = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--threads", "1"]


def run_bench(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(BENCH), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def independent_flops() -> int:
    """One forward and backward of the bench's CPU row (VDiT-T/2, 2 clips of 4 x 4 x 16 x 16, 16 text tokens),
    counted on real CPU tensors with attention as explicit matmuls (the fused CPU kernel has no FLOP formula)."""
    model = VDiT(vdit_config("VDiT-T/2", in_channels=4))
    x, context = torch.randn(2, 4, 4, 16, 16), torch.randn(2, 16, 64)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 7:] = False
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([3, 900]), context, mask).pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.slow
def test_cpu_bench_measures_both_paths_with_counted_flops(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "train_gpu.json"
    result = run_bench([*QUICK, "--json", str(out)])
    report = json.loads(out.read_text())
    rows = {row["path"]: row for row in report["rows"]}
    assert set(rows) == {"plain", "real"} and len(report["rows"]) == 2
    flops = independent_flops()
    assert flops > 0
    for path, row in rows.items():
        assert (row["preset"], row["shape"], row["batch"], row["tokens_per_sample"]) == (
            "VDiT-T/2",
            "latent-tiny",
            2,
            4 * 8 * 8,
        ), path
        assert row["samples_per_s"] > 0 and row["peak_mem_bytes"] > 0, path
        assert row["flops_per_step"] == flops, path
        assert row["tokens_per_s"] == pytest.approx(256 * row["samples_per_s"])
        assert row["tflops"] == pytest.approx(flops * row["samples_per_s"] / 2 / 1e12)
        assert row["mfu"] is None  # no peak known for a CPU
    assert rows["real"]["real_over_plain"] == pytest.approx(
        rows["real"]["samples_per_s"] / rows["plain"]["samples_per_s"]
    )
    table = result.stdout[result.stdout.rindex("| preset |") :].splitlines()
    assert [line.split("|")[3].strip() for line in table[2:]] == ["plain", "real"]
    assert all(" n/a " in line for line in table[2:])


@pytest.mark.slow
def test_plain_path_runs_where_only_torch_is_installed(tmp_path):
    """The GPU machine has torch, numpy and einops only: the engine row is skipped with a note, the plain one runs.
    The other packages are shadowed by ones that fail to import, in the bench and in the children it starts."""
    hidden = tmp_path / "hidden"
    for name in ("deepspeed", "ray", "mlflow", "open_clip", "yaml"):
        (hidden / name).mkdir(parents=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed (hidden by a test)')")
    out = tmp_path / "train_gpu.json"
    result = run_bench([*QUICK, "--json", str(out)], env={"PYTHONPATH": str(hidden)})
    assert "engine path skipped: deepspeed is not installed" in result.stdout
    rows = {row["path"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["plain"]["samples_per_s"] > 0
    assert rows["real"]["samples_per_s"] is None and "skipped" in rows["real"]["note"]


def test_shipped_shapes_are_those_of_the_shipped_config():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import train_gpu
    finally:
        sys.path.remove(str(BENCH.parent))
    from pipelines.config import load_config
    from training.config import TrainConfig

    config = load_config(TrainConfig, ROOT / "configs" / "train" / "vdit-s.yaml")
    assert config.text.model_name == "ViT-L-14"  # 768-wide text tokens
    expected = [
        (
            config.model.preset,
            stage.num_frames,
            stage.size,
            config.deepspeed.micro_batch_size,
            config.model.overrides.get("grad_checkpointing", False),
            768,
        )
        for stage in config.curriculum
    ]
    shipped = [(s.preset, s.frames, s.size, s.batch, s.grad_checkpointing, s.context_dim) for s in train_gpu.SHIPPED]
    assert shipped == expected
    assert config.codec.kind == "pixels" and all(s.channels == 3 for s in train_gpu.SHIPPED)


def test_gpu_check_script_parses_and_passes_flags_the_bench_has():
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    lines = script.read_text().replace("\\\n", " ").splitlines()  # continuation lines joined
    command = next(line for line in lines if "bench/train_gpu.py" in line and "timeout" in line)
    help_text = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True).stdout
    flags = [word for word in command.split() if word.startswith("--")]
    assert {"--device", "--shapes", "--json"} <= set(flags)
    assert all(flag in help_text for flag in flags), flags
