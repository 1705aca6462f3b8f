"""ONNX export of the denoiser on a tiny random VDiT saved as `reelforge train` saves one: the checker, parity with
PyTorch per evaluation (batch 1 and 3: the batch is dynamic) and over a whole DDIM trajectory with CFG, the
`export-onnx` command, and `generate --backend onnxruntime` against the torch backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_generate import FRAMES, PROMPT, SIZE, _export, _gif

from models.codec import CodecConfig, build_codec
from pipelines.cli import main
from training.export import load_model
from training.onnx_export import (
    DENOISER,
    DESCRIPTION,
    TOLERANCES,
    OnnxDenoiser,
    example_inputs,
    export_denoiser,
    trained_shapes,
)
from training.sample import generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher (3 DDIM steps, CFG 3) and its ONNX folder, written by the command as a user would."""
    root = tmp_path_factory.mktemp("onnx")
    model = _export(root / "train" / "model", 0, {"num_steps": 3, "cfg_scale": 3.0})
    assert main(["export-onnx", "--model", str(model), "--out", str(root / "onnx")]) == 0
    return {"model": model, "onnx": root / "onnx"}


def test_export_onnx_writes_a_checked_graph_and_its_description(exported):
    import onnx

    out = exported["onnx"]
    assert {DENOISER, DESCRIPTION, "config.json", "text_encoder.safetensors"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging or partial files left behind
    onnx.checker.check_model(str(out / DENOISER), full_check=True)
    description = json.loads((out / DESCRIPTION).read_text())
    assert description["opset"] == 17 and description["tolerances"] == TOLERANCES
    assert description["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["batch", 3, FRAMES, SIZE, SIZE]}
    assert [i["name"] for i in description["inputs"]] == ["x", "t", "context", "context_mask"]
    assert "unsplit" in description["attention"]
    measured = description["measured"]
    assert measured["evaluation_max_abs"] <= TOLERANCES["evaluation_max_abs"]
    assert measured["trajectory"]["max_abs"] <= TOLERANCES["trajectory_max_abs"]
    graph = onnx.load(str(out / DENOISER))
    batch_dims = [i.type.tensor_type.shape.dim[0].dim_param for i in graph.graph.input]
    assert batch_dims == ["batch"] * 4


@pytest.mark.parametrize("batch", [1, 3])
def test_one_evaluation_equals_pytorch_at_any_batch(exported, batch):
    loaded = load_model(exported["model"])
    denoiser = OnnxDenoiser(exported["onnx"] / DENOISER)
    inputs = example_inputs(denoiser.shapes, batch, seed=10 + batch)
    with torch.no_grad():
        expected = loaded.model(*inputs)
    got = denoiser(*inputs)
    assert got.shape == expected.shape == (batch, 3, FRAMES, SIZE, SIZE)
    assert expected.abs().max() > 0.1  # random weights: a real output, not adaLN-Zero's zeros
    assert (got - expected).abs().max().item() <= TOLERANCES["evaluation_max_abs"]


def test_a_whole_ddim_trajectory_gives_the_same_video(exported):
    loaded = load_model(exported["model"])
    codec = build_codec(CodecConfig())
    shapes = trained_shapes(loaded, codec)
    prompts = [PROMPT, "a blue square"]
    args = (loaded.text_encoder, loaded.schedule, prompts, shapes.frames, shapes.height, 8, 3.0, 5)
    expected = generate(loaded.model, *args)
    got = generate(OnnxDenoiser(exported["onnx"] / DENOISER), *args)
    assert (got - expected).abs().max().item() <= TOLERANCES["trajectory_max_abs"]
    levels = np.abs(codec.decode(got).astype(int) - codec.decode(expected).astype(int)).max()
    assert levels <= TOLERANCES["frame_max_levels"]


def test_the_graph_is_exported_at_the_trained_shape_only(exported, tmp_path):
    denoiser = OnnxDenoiser(exported["onnx"] / DENOISER)
    x, t, context, mask = example_inputs(denoiser.shapes, 1)
    with pytest.raises(ValueError, match="exported for inputs"):
        denoiser(torch.cat([x, x], dim=2), t, context, mask)
    loaded = load_model(exported["model"])
    path = tmp_path / "again.onnx"
    export_denoiser(loaded.model, path, trained_shapes(loaded, build_codec(CodecConfig())))
    assert OnnxDenoiser(path).config == loaded.model.config  # the config travels in the graph's metadata


def test_generate_with_onnxruntime_matches_the_torch_backend(exported, tmp_path):
    common = ["--prompt", PROMPT, "--seed", "3", "--gif"]
    assert main(["generate", "--model", str(exported["model"]), *common, "--out", str(tmp_path / "torch.mp4")]) == 0
    assert main(["generate", "--backend", "onnxruntime", "--model", str(exported["onnx"]), *common,
                 "--out", str(tmp_path / "ort.mp4")]) == 0
    torch_frames, ort_frames = _gif(tmp_path / "torch.gif"), _gif(tmp_path / "ort.gif")
    assert torch_frames.shape == ort_frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.abs(torch_frames.astype(int) - ort_frames.astype(int)).max() <= TOLERANCES["frame_max_levels"]
    sidecar = json.loads((tmp_path / "ort.json").read_text())
    assert sidecar["backend"] == "onnxruntime" and sidecar["steps"] == 3 and sidecar["cfg_scale"] == 3.0


def test_int8_export_runs_and_reports_its_error(exported, tmp_path):
    out = tmp_path / "int8"
    assert main(["export-onnx", "--model", str(exported["model"]), "--out", str(out), "--int8"]) == 0
    description = json.loads((out / DESCRIPTION).read_text())
    assert description["weights"] == "int8"
    assert (out / DENOISER).stat().st_size < (exported["onnx"] / DENOISER).stat().st_size / 2
    error = description["measured"]["int8"]["evaluation_max_abs"]
    assert TOLERANCES["evaluation_max_abs"] < error < 0.1  # quantised: off by more than fp32 rounding, yet close
    assert main(["generate", "--backend", "onnxruntime", "--model", str(out), "--prompt", PROMPT,
                 "--out", str(tmp_path / "int8.gif")]) == 0
    assert _gif(tmp_path / "int8.gif").shape == (FRAMES, SIZE, SIZE, 3)


def test_a_rerun_of_export_onnx_skips_a_done_export(exported, capsys):
    assert main(["export-onnx", "--model", str(exported["model"]), "--out", str(exported["onnx"])]) == 0
    assert "already exported" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing model", "onnx folder without --backend", "model without onnx"])
def test_bad_inputs_exit_2_with_one_line(exported, tmp_path, capsys, case):
    argv = {
        "missing model": ["export-onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        "onnx folder without --backend": ["export-onnx", "--model", str(exported["onnx"]), "--out",
                                          str(tmp_path / "o")],
        "model without onnx": ["generate", "--backend", "onnxruntime", "--model", str(exported["model"]), "--prompt",
                               PROMPT, "--out", str(tmp_path / "v.mp4")],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"reelforge {argv[0]}: error:"), err
