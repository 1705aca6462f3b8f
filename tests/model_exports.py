"""Exported models with random weights for tests of what reads an export (evaluate, generate, the MLflow
comparison): a VDiT-T/2 saved as training/export.py saves a trained one."""

from __future__ import annotations

from pathlib import Path

import torch

from models.schedules import ScheduleConfig
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
from models.vdit import VDiT, vdit_config
from training.export import save_model


def export_random_model(directory: Path | str, seed: int, sampling: dict, curriculum: list[dict], steps: int = 20,
                        text_encoder: TextEncoderConfig | None = None, **extra) -> Path:
    """A VDiT-T/2 with seeded random weights everywhere, exported to `directory` with this training record."""
    torch.manual_seed(seed)
    config = vdit_config("VDiT-T/2")
    model = VDiT(config)
    with torch.no_grad():  # adaLN-Zero starts every random model at the same zero output: make them differ
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    save_model(directory, model.state_dict(), config, FrozenTextEncoder(text_encoder or TextEncoderConfig()),
               ScheduleConfig(), {"preset": "VDiT-T/2", "steps": steps, "curriculum": curriculum, "ema_decay": 0.995,
                                  "weights": "ema", "sampling": sampling, **extra})
    return Path(directory)
