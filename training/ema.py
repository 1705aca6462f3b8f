"""Exponential moving average of the weights, over whatever tensors a rank holds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


class EMA:
    """EMA of `tensors`: whole parameters on one process or under ZeRO 0-2, this rank's partitions under ZeRO-3
    (`Engine.local_tensors()`), so the EMA is sharded exactly like the parameters and costs no communication."""

    def __init__(self, tensors: Iterable[torch.Tensor], decay: float):
        self.decay = decay
        self.tensors = list(tensors)
        self.shadow = [t.detach().float().clone() for t in self.tensors]

    @classmethod
    def of_module(cls, module: torch.nn.Module, decay: float) -> EMA:
        return cls([p.data for p in module.parameters()], decay)

    @torch.no_grad()
    def update(self) -> None:
        for t, s in zip(self.tensors, self.shadow, strict=True):
            s.lerp_(t.float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the model (for sampling and export)."""
        backup = [t.detach().clone() for t in self.tensors]
        try:
            with torch.no_grad():
                for t, s in zip(self.tensors, self.shadow, strict=True):
                    t.copy_(s)
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(self.tensors, backup, strict=True):
                    t.copy_(b)

    def state_dict(self) -> list[torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: list[torch.Tensor]) -> None:
        mismatched = any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=False))
        if len(shadow) != len(self.shadow) or mismatched:
            raise ValueError("the EMA in the checkpoint does not match the model (different preset or ZeRO layout)")
        self.shadow = [s.float().clone() for s in shadow]
