"""The exported model: consolidated weights in one safetensors file with its config beside it, loadable in a fresh
process with neither Ray nor DeepSpeed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.schedules import NoiseSchedule, ScheduleConfig
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
from models.vdit import VDiT, VDiTConfig

WEIGHTS = "model.safetensors"
TEXT_WEIGHTS = "text_encoder.safetensors"
CONFIG = "config.json"


def save_model(directory: str | Path, state_dict: dict[str, torch.Tensor], model_config: VDiTConfig,
               text_encoder: FrozenTextEncoder, schedule_config: ScheduleConfig, extra: dict) -> None:
    """Write the model. A randomly initialised text tower is saved too (it cannot be rebuilt from a tag)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}, directory / WEIGHTS,
              metadata={"format": "pt"})
    if text_encoder.untrained:
        save_file({k: v.contiguous().cpu() for k, v in text_encoder.state_dict().items()}, directory / TEXT_WEIGHTS)
    config = {"model": dataclasses.asdict(model_config), "text": dataclasses.asdict(text_encoder.config),
              "schedule": dataclasses.asdict(schedule_config), **extra}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


@dataclass
class LoadedModel:
    model: VDiT
    text_encoder: FrozenTextEncoder
    schedule: NoiseSchedule
    config: dict
    codec: object = None  # what the model denoises in (models.codec): decode its samples through it


def export_codec(config: dict, device: str = "cpu"):
    """The codec an exported model was trained in, rebuilt from its config.json: `codec_config` (a CodecConfig
    without its device; exports older than it name only their codec's id, which was "pixels"). The rebuilt codec's
    id must be the recorded one: another VAE, or the same one with other weights, would decode garbage."""
    from models.codec import CodecConfig, build_codec

    section = dict(config.get("codec_config") or {"kind": "pixels"})
    if section.get("kind", "pixels") != "pixels":
        section["device"] = device
    codec = build_codec(CodecConfig(**section))
    recorded = config.get("codec", codec.id)
    if codec.id != recorded:
        raise ValueError(f"the model was trained in codec {recorded!r}, but its codec_config now builds {codec.id!r} "
                         "(other weights at that path or revision?): restore the codec it was trained with")
    return codec


def load_model(directory: str | Path, device: str = "cpu") -> LoadedModel:
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG}: expected the `model/` folder of a training run")
    config = json.loads((directory / CONFIG).read_text())
    model = VDiT(VDiTConfig(**config["model"]))
    model.load_state_dict(load_file(directory / WEIGHTS))
    text_encoder = FrozenTextEncoder(TextEncoderConfig(**config["text"]))
    if (directory / TEXT_WEIGHTS).is_file():
        text_encoder.load_state_dict(load_file(directory / TEXT_WEIGHTS))
    schedule = NoiseSchedule(ScheduleConfig(**config["schedule"]))
    return LoadedModel(model.to(device).eval(), text_encoder.to(device), schedule, config,
                       export_codec(config, device))
