"""The denoiser as ONNX: one VDiT evaluation at the shapes the model was trained at (any batch) exported with
`torch.onnx.export`, checked with `onnx.checker` and against PyTorch under ONNX Runtime, and `OnnxDenoiser`, an ONNX
Runtime session that `training.sample.generate` calls exactly like the model."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.vdit import VDiT, VDiTConfig

DENOISER = "denoiser.onnx"
DESCRIPTION = "onnx.json"
OPSET = 17
INPUTS = ("x", "t", "context", "context_mask")
OUTPUT = "prediction"
CONFIG_KEY = "reelforge.vdit_config"  # the VDiTConfig as JSON in the ONNX model's metadata, so a session is
SHAPES_KEY = "reelforge.shapes"  # self-describing without the model folder
# fp32 throughout; what `reelforge export-onnx` and tests/test_onnx.py hold the exported graph to
TOLERANCES = {
    "evaluation_max_abs": 1e-4,  # one network evaluation on the same inputs
    "trajectory_max_abs": 1e-3,  # the final sample of a whole DDIM trajectory (with CFG), in the model's data range
    "frame_max_levels": 1,  # the decoded uint8 frames of that trajectory
}


@dataclass(frozen=True)
class DenoiserShapes:
    """The per-example shapes the graph is exported at; only the batch is dynamic."""

    channels: int
    frames: int  # in the codec's space (latent frames), as the denoiser sees them
    height: int
    width: int
    context_length: int
    context_dim: int

    def input_specs(self) -> list[dict]:
        return [
            {"name": "x", "dtype": "float32", "shape": ["batch", self.channels, self.frames, self.height, self.width]},
            {"name": "t", "dtype": "int64", "shape": ["batch"]},
            {"name": "context", "dtype": "float32", "shape": ["batch", self.context_length, self.context_dim]},
            {"name": "context_mask", "dtype": "bool", "shape": ["batch", self.context_length]},
        ]

    def largest_attention_batch(self, config: VDiTConfig, batch: int) -> int:
        """Sequences in the largest attention call for `batch` videos: temporal attention runs one per token
        location, spatial attention one per latent frame."""
        frames = self.frames // config.patch_frames
        locations = (self.height // config.patch_size) * (self.width // config.patch_size)
        return batch * max(frames, locations)


def trained_shapes(loaded, codec) -> DenoiserShapes:
    """The shapes of the last curriculum stage (what the model was trained at, and what generate samples by default)
    in the codec's space, with the text encoder's context."""
    stage = (loaded.config.get("curriculum") or [{}])[-1]
    if stage.get("num_frames") is None or stage.get("size") is None:
        raise ValueError("config.json has no curriculum stage with num_frames and size: the exported graph needs the "
                         "shapes the model was trained at")
    config: VDiTConfig = loaded.model.config
    # the codec's latent shape: a causal VAE at 4x in time takes 5 frames to 2
    _, frames, height, width = codec.latent_shape(int(stage["num_frames"]), int(stage["size"]), int(stage["size"]))
    return DenoiserShapes(channels=config.in_channels, frames=frames, height=height, width=width,
                          context_length=int(loaded.text_encoder.config.context_length),
                          context_dim=config.context_dim)


def example_inputs(shapes: DenoiserShapes, batch: int, seed: int = 0,
                   num_train_timesteps: int = 1000) -> tuple[torch.Tensor, ...]:
    """Random inputs of the exported shapes: unit noise, timesteps over the whole schedule, unit-scale text features
    and masks of every length from one token to all (the padding and all-padding paths of cross-attention)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, shapes.channels, shapes.frames, shapes.height, shapes.width), generator=generator)
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    context = torch.randn((batch, shapes.context_length, shapes.context_dim), generator=generator)
    lengths = torch.randint(1, shapes.context_length + 1, (batch,), generator=generator)
    mask = torch.arange(shapes.context_length)[None] < lengths[:, None]
    return x, t, context, mask


def export_denoiser(model: VDiT, path: str | Path, shapes: DenoiserShapes, opset: int = OPSET) -> None:
    """Write one evaluation of `model` (fp32, on the CPU) to `path` with a dynamic batch. The TorchScript exporter
    (dynamo=False) is used: it traces SDPA and einops' reshapes of VDiT into plain ONNX ops reliably, and its
    `dynamic_axes` keeps every other dimension at the trained shape."""
    import onnx

    model = model.float().cpu().eval()
    inputs = example_inputs(shapes, batch=2)
    dynamic = {name: {0: "batch"} for name in (*INPUTS, OUTPUT)}
    with warnings.catch_warnings(), torch.no_grad():
        # tracer warnings about Python branches on shapes: each is decided by a shape that is fixed in the graph
        # (the patch grid, chunked_sdpa's batch test, the position-embedding cache), never by the batch
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=opset, input_names=list(INPUTS),
                          output_names=[OUTPUT], dynamic_axes=dynamic, do_constant_folding=True)
    proto = onnx.load(str(path), load_external_data=False)
    for key, value in ((CONFIG_KEY, json.dumps(asdict(model.config), sort_keys=True)),
                       (SHAPES_KEY, json.dumps(asdict(shapes), sort_keys=True))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def check_denoiser(model: VDiT, path: str | Path, batches: tuple[int, ...] = (1, 3), seed: int = 0,
                   num_train_timesteps: int = 1000) -> float:
    """`onnx.checker` on the file, then the largest absolute difference between ONNX Runtime and PyTorch over random
    inputs at each batch size in `batches` (other sizes than the export's own 2, so the batch is really dynamic)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)  # by path: models over 2 GB keep their weights beside it
    session = OnnxDenoiser(path)
    model = model.float().cpu().eval()
    worst = 0.0
    for i, batch in enumerate(batches):
        inputs = example_inputs(session.shapes, batch, seed + i, num_train_timesteps)
        with torch.no_grad():
            expected = model(*inputs)
        worst = max(worst, (session(*inputs) - expected).abs().max().item())
    return worst


def quantize_denoiser(source: str | Path, target: str | Path) -> None:
    """int8 weights by ONNX Runtime's dynamic quantisation: the MatMul and Gemm weights (every Linear: attention,
    MLPs, adaLN) are stored as int8 and activations quantised per call; the Conv3d patch embedding stays fp32 (ORT's
    ConvInteger is slower than its fp32 convolution on CPU). The metadata OnnxDenoiser reads is kept."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


class OnnxDenoiser:
    """An ONNX Runtime session over an exported denoiser, called like the VDiT it came from:
    `OnnxDenoiser(path)(x, t, context, context_mask) -> torch.Tensor` on x's device, so the sampling loop runs
    unchanged. `config` is the VDiTConfig (callers read in_channels from it); inputs must have the exported shapes."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX model (expected the {DENOISER} that `reelforge "
                                    "export-onnx` writes)")
        options = ort.SessionOptions()
        # one thread setting for both backends: torch's (tests pin it to 1 on shared CI cores)
        options.intra_op_num_threads = threads or torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in metadata or SHAPES_KEY not in metadata:
            raise ValueError(f"{self.path} was not written by `reelforge export-onnx` (no {CONFIG_KEY} metadata): "
                             "export it again")
        self.config = VDiTConfig(**json.loads(metadata[CONFIG_KEY]))
        self.shapes = DenoiserShapes(**json.loads(metadata[SHAPES_KEY]))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 context_mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.shapes
        expected = (s.channels, s.frames, s.height, s.width)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"the ONNX denoiser {self.path} was exported for inputs (B, C, T, H, W) = (B, "
                             f"{', '.join(map(str, expected))}) and got {tuple(x.shape)}: sample at the shape the "
                             "model was trained at (leave out --num-frames/--size) or use --backend torch")
        if tuple(context.shape[1:]) != (s.context_length, s.context_dim):
            raise ValueError(f"the ONNX denoiser {self.path} expects text context (B, {s.context_length}, "
                             f"{s.context_dim}), got {tuple(context.shape)}")
        batch = x.shape[0]
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool)
        t = torch.as_tensor(t).reshape(-1).expand(batch)  # as VDiT: a scalar t is shared by the batch
        feed = {
            "x": x.detach().float().cpu().numpy(),
            "t": t.detach().to(torch.int64).cpu().numpy(),
            "context": context.detach().float().cpu().numpy(),
            "context_mask": context_mask.detach().to(torch.bool).cpu().numpy(),
        }
        (out,) = self.session.run([OUTPUT], {k: np.ascontiguousarray(v) for k, v in feed.items()})
        return torch.from_numpy(out).to(x.device)


def load_onnx_model(directory: str | Path, device: torch.device | str = "cpu"):
    """An exported ONNX folder as a training.export.LoadedModel whose `model` is an OnnxDenoiser: the text tower and
    schedule come from the config.json (and text weights) copied beside the graph."""
    from safetensors.torch import load_file

    from models.schedules import NoiseSchedule, ScheduleConfig
    from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
    from training.export import CONFIG, TEXT_WEIGHTS, LoadedModel

    directory = Path(directory)
    if not (directory / DENOISER).is_file():
        raise FileNotFoundError(f"{directory} has no {DENOISER}: run `reelforge export-onnx --model {directory} "
                                "--out DIR` and pass --model DIR with --backend onnxruntime")
    config = json.loads((directory / CONFIG).read_text())
    text_encoder = FrozenTextEncoder(TextEncoderConfig(**config["text"]))
    if (directory / TEXT_WEIGHTS).is_file():
        text_encoder.load_state_dict(load_file(directory / TEXT_WEIGHTS))
    schedule = NoiseSchedule(ScheduleConfig(**config["schedule"]))
    from training.export import export_codec

    return LoadedModel(OnnxDenoiser(directory / DENOISER, device), text_encoder.to(device), schedule, config,
                       export_codec(config, str(device)))  # a latent model's samples decode through its codec

