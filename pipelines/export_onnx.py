"""`reelforge export-onnx`: an exported model's denoiser as DIR/denoiser.onnx (dynamic batch, the trained shapes),
checked against PyTorch, with the config and text tower beside it so `reelforge generate --backend onnxruntime --model
DIR` runs it. DIR/onnx.json, written last, describes the graph and the errors measured, and marks the export done."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from models.checksum import sha256_of

log = logging.getLogger("reelforge.export_onnx")

FORMAT = "reelforge-onnx-denoiser/1"


@dataclass
class ExportOnnxConfig:
    model: str  # an exported model folder, models:/NAME/VERSION or runs:/RUN_ID/model
    out: str  # the directory to write
    opset: int = 17
    check_steps: int = 4  # DDIM steps of the trajectory compared between ONNX Runtime and PyTorch (0: none)
    seed: int = 0
    int8: bool = False  # write the graph with int8 weights (dynamic quantisation) instead of fp32
    tracking_uri: str | None = None
    cache_dir: str | None = None


def _trajectory_error(loaded, denoiser, codec, shapes, steps: int, seed: int) -> dict:
    """One prompt sampled with `steps` DDIM steps and the model's guidance by both backends from the same noise."""
    from training.sample import generate

    cfg = float((loaded.config.get("sampling") or {}).get("cfg_scale", 1.0))
    args = (loaded.text_encoder, loaded.schedule, ["an exported model's check"], shapes.frames, shapes.height, steps,
            cfg, seed)
    kwargs = {"in_channels": shapes.channels, "clip_x0": codec.clip_range}
    expected = generate(loaded.model, *args, **kwargs)
    got = generate(denoiser, *args, **kwargs)
    levels = abs(codec.decode(got).astype(int) - codec.decode(expected).astype(int)).max()
    return {"steps": steps, "cfg_scale": cfg, "max_abs": float((got - expected).abs().max()),
            "frame_max_levels": int(levels)}


def run_export_onnx(config: ExportOnnxConfig) -> dict:
    import onnx
    import onnxruntime
    import torch

    from models.codec import CodecConfig, build_codec
    from models.vdit import MAX_ATTENTION_BATCH
    from pipelines.generate import GenerateConfig, resolve_model
    from training.export import CONFIG, TEXT_WEIGHTS, WEIGHTS, load_model
    from training.onnx_export import (
        DENOISER,
        DESCRIPTION,
        TOLERANCES,
        OnnxDenoiser,
        check_denoiser,
        export_denoiser,
        quantize_denoiser,
        trained_shapes,
    )

    started = time.perf_counter()
    if config.opset < 17:
        raise ValueError(f"--opset {config.opset}: expected 17 or later (LayerNormalization is an ONNX op from 17)")
    if config.check_steps < 0:
        raise ValueError(f"--check-steps {config.check_steps}: expected 0 or more")
    folder, model_id = resolve_model(GenerateConfig(model=config.model, out=config.out,
                                                    tracking_uri=config.tracking_uri, cache_dir=config.cache_dir))
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}: expected the model/ folder of `reelforge train` or "
                                "`distill` (an ONNX export folder cannot be exported again)")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory for {DENOISER} and {DESCRIPTION}")
    source_sha256 = sha256_of(folder / WEIGHTS)
    done = out / DESCRIPTION
    if done.is_file() and (out / DENOISER).is_file():
        try:
            recorded = json.loads(done.read_text())
        except ValueError:
            recorded = {}
        weights = "int8" if config.int8 else "fp32"
        if (recorded.get("source_sha256"), recorded.get("opset"), recorded.get("weights")) == (
                source_sha256, config.opset, weights):
            log.info("%s already holds this model's %s export (opset %d): nothing to do", out, weights, config.opset)
            return {**recorded, "skipped": True, "out": str(out)}

    loaded = load_model(folder, "cpu")
    codec = build_codec(CodecConfig(kind=loaded.config.get("codec", "pixels")))
    shapes = trained_shapes(loaded, codec)
    num_train_timesteps = loaded.schedule.config.num_train_timesteps
    out.mkdir(parents=True, exist_ok=True)
    # export into a staging folder (the exporter may write weights of models over 2 GB beside the graph), then move
    staging = Path(tempfile.mkdtemp(prefix=".export-onnx-", dir=out))
    try:
        tick = time.perf_counter()
        export_denoiser(loaded.model, staging / DENOISER, shapes, config.opset)
        export_seconds = time.perf_counter() - tick
        evaluation_error = check_denoiser(loaded.model, staging / DENOISER, (1, 3), config.seed, num_train_timesteps)
        log.info("exported and checked %s in %.1f s: max abs error of one evaluation %.2e", model_id, export_seconds,
                 evaluation_error)
        if evaluation_error > TOLERANCES["evaluation_max_abs"]:
            raise ValueError(f"the ONNX denoiser differs from PyTorch by {evaluation_error:.2e} on the same inputs "
                             f"(tolerance {TOLERANCES['evaluation_max_abs']:g}): not written to {out}")
        trajectory = None
        if config.check_steps:
            trajectory = _trajectory_error(loaded, OnnxDenoiser(staging / DENOISER), codec, shapes,
                                           config.check_steps, config.seed)
            log.info("a %d-step DDIM trajectory: max abs error %.2e, frames within %d levels", config.check_steps,
                     trajectory["max_abs"], trajectory["frame_max_levels"])
            if (trajectory["max_abs"] > TOLERANCES["trajectory_max_abs"]
                    or trajectory["frame_max_levels"] > TOLERANCES["frame_max_levels"]):
                raise ValueError(f"a {config.check_steps}-step DDIM trajectory through ONNX Runtime differs from "
                                 f"PyTorch's ({trajectory}; tolerances {TOLERANCES}): not written to {out}")
        quantized = None
        if config.int8:
            # int8 is not held to the fp32 tolerances: its errors are reported, and whether its videos are good
            # enough is a question for prompt adherence on held-out prompts (`reelforge evaluate`), not for max abs
            quantize_denoiser(staging / DENOISER, staging / f"int8-{DENOISER}")
            os.replace(staging / f"int8-{DENOISER}", staging / DENOISER)
            quantized = {"evaluation_max_abs": check_denoiser(loaded.model, staging / DENOISER, (1, 3), config.seed,
                                                              num_train_timesteps)}
            if config.check_steps:
                quantized["trajectory"] = _trajectory_error(loaded, OnnxDenoiser(staging / DENOISER), codec, shapes,
                                                            config.check_steps, config.seed)
            log.info("int8 weights: %s", quantized)
        (out / DESCRIPTION).unlink(missing_ok=True)  # the old record goes first: a torn export is never "done"
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in (CONFIG, TEXT_WEIGHTS):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / f".{name}.partial")
            os.replace(out / f".{name}.partial", out / name)

    attention = shapes.largest_attention_batch(loaded.model.config, 1)
    description = {
        "format": FORMAT,
        "source": model_id,
        "source_sha256": source_sha256,
        "onnx_sha256": sha256_of(out / DENOISER),
        "opset": config.opset,
        "exporter": "torch.onnx.export, TorchScript (dynamo=False), fp32, constant folding",
        "weights": "int8" if config.int8 else "fp32",
        "quantization": "onnxruntime.quantization.quantize_dynamic, QInt8 weights of MatMul and Gemm (the Conv3d "
                        "patch embedding stays fp32); the tolerances hold for the fp32 graph it was made from"
                        if config.int8 else None,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "inputs": shapes.input_specs(),
        "outputs": [{"name": "prediction", "dtype": "float32",
                     "shape": ["batch", shapes.channels, shapes.frames, shapes.height, shapes.width],
                     "meaning": loaded.schedule.config.prediction}],
        "dynamic": "batch only (CFG runs conditional and unconditional halves as one batch of 2B); every other "
                   "dimension is the last curriculum stage's, the shape `reelforge generate` samples by default",
        "trained_at": {**(loaded.config.get("curriculum") or [{}])[-1], "codec": codec.config.kind},
        "attention": f"models.vdit.chunked_sdpa splits attention batches above {MAX_ATTENTION_BATCH} sequences; one "
                     f"video here has {attention} in its largest call, so the graph holds one unsplit attention per "
                     f"call (fine up to a batch of {MAX_ATTENTION_BATCH // attention} videos)",
        "tolerances": TOLERANCES,
        "measured": {"evaluation_max_abs": evaluation_error, "evaluation_batches": [1, 3], "trajectory": trajectory,
                     "int8": quantized},
        "export_seconds": export_seconds,
    }
    partial = out / f".{DESCRIPTION}.partial"
    partial.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    os.replace(partial, out / DESCRIPTION)
    return {**description, "skipped": False, "out": str(out), "wall_seconds": time.perf_counter() - started}


def summary_text(summary: dict) -> str:
    from curation.redact import redact_uri

    x = summary["inputs"][0]["shape"]
    measured = summary["measured"]
    trajectory = measured.get("trajectory")
    lines = [
        f"model: {redact_uri(summary['source'])} -> {summary['out']}/denoiser.onnx (opset {summary['opset']}, "
        f"{summary.get('weights', 'fp32')} weights)"
        + (" (already exported)" if summary.get("skipped") else ""),
        f"inputs: x {x}, t [batch], context {summary['inputs'][2]['shape']}, context_mask; only the batch is dynamic",
        f"checked: onnx.checker passed; one evaluation within {measured['evaluation_max_abs']:.1e} of PyTorch "
        f"(tolerance {summary['tolerances']['evaluation_max_abs']:g})"
        + (f"; a {trajectory['steps']}-step DDIM video within {trajectory['max_abs']:.1e} "
           f"({trajectory['frame_max_levels']} uint8 levels)" if trajectory else ""),
        *([f"int8 weights: one evaluation within {measured['int8']['evaluation_max_abs']:.1e} of PyTorch "
           "(reported, not held to a tolerance)"] if measured.get("int8") else []),
        f"use: reelforge generate --backend onnxruntime --model {summary['out']} --prompt \"...\" --out FILE.mp4",
    ]
    return "\n".join(lines)

