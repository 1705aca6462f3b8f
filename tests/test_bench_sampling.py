"""bench/sampling.py's GPU mode (--preset) smoke-tested on the CPU: every row timed and reported, and nothing imported
beyond torch, numpy, einops and models/ (the GPU machine has no MLflow, PyAV or open_clip)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, runpy, sys
sys.argv = ["bench/sampling.py", "--device", "cpu", "--preset", "VDiT-T/2", "--latent", "4x2x8x8",
            "--context-length", "8", "--compile", "none", "--repeats", "1", "--threads", "1",
            "--samplings", "teacher DPM-Solver++ 8 + CFG;student 4", "--json", sys.argv[1]]
runpy.run_path("bench/sampling.py", run_name="__main__")
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"training", "pipelines", "curation", "mlflow", "av", "PIL",
                                                          "open_clip", "onnxruntime", "onnx", "diffusers"})
print("HEAVY " + json.dumps(heavy))
"""


@pytest.mark.slow
def test_preset_mode_times_every_row_with_models_only(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    heavy = json.loads(done.stdout.split("HEAVY ")[-1])
    assert heavy == []
    result = json.loads(out.read_text())
    rows = [(r["name"], r["backend"], r["sampler"], r["evaluations"]) for r in result["rows"]]
    assert rows == [("teacher DPM-Solver++ 8 + CFG", "torch eager", "dpmpp-2m", 16),
                    ("student 4", "torch eager", "ddim", 4)]
    assert all(r["seconds_per_video"] > 0 for r in result["rows"]) and result["rows"][0]["speedup"] == 1.0
    assert result["info"]["tokens"] == 2 * 4 * 4 and "| student 4 | torch eager | 4 |" in done.stdout
