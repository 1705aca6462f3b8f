"""The training engine: DeepSpeed ZeRO behind one small class. This is the only module that imports `deepspeed` or
touches its internals (partitioned tensors, optimizer attribute names, gathering for export)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import TrainConfig

CHECKPOINT_TAG = "ds"


def deepspeed_config(config: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of a run. The optimizer is passed in by `Engine` (torch's AdamW, fused on a GPU);
    DeepSpeed's own schedulers give the LR warm-up and decay."""
    ds, optim = config.deepspeed, config.optim
    zero: dict = {**ds.zero_options, "stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": config.scaling.use_gpu}
    return {
        "train_batch_size": ds.micro_batch_size * ds.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "scheduler": _scheduler(config),
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _scheduler(config: TrainConfig) -> dict:
    optim = config.optim
    warmup = max(1, optim.warmup_steps)
    total = max(config.total_steps, warmup + 1)
    if optim.decay == "cosine":
        return {"type": "WarmupCosineLR", "params": {"total_num_steps": total, "warmup_num_steps": warmup,
                                                     "warmup_min_ratio": 0.0, "cos_min_ratio": optim.min_lr_ratio,
                                                     "warmup_type": "linear"}}
    if optim.decay == "linear":
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": total, "warmup_num_steps": warmup,
                                                    "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr,
                                                    "warmup_type": "linear"}}
    return {"type": "WarmupLR", "params": {"warmup_num_steps": warmup, "warmup_min_lr": 0.0,
                                           "warmup_max_lr": optim.lr, "warmup_type": "linear"}}


def all_reduce_host(values: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over all ranks, whatever the backend (NCCL reduces device tensors only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    if dist.get_backend() == "nccl":
        on_device = values.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device)
        return on_device.cpu()
    dist.all_reduce(values)
    return values


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: the whole tensor under ZeRO 0-2, its partition under ZeRO-3."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class Engine:
    """One DeepSpeed engine per worker: forward, backward and step, sharded save and load, the weights gathered for
    export, and how much state this rank holds. The same code runs on 1 CPU worker and on many GPUs."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, world_size: int, use_gpu: bool):
        import deepspeed

        optim = config.optim
        # torch's AdamW: ZeRO shards it like its own; fused=True is one kernel per step on a GPU
        optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      weight_decay=optim.weight_decay, fused=use_gpu)
        self._engine, self._optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config, world_size))
        self.zero3 = config.deepspeed.zero_stage == 3
        self.dtype = torch.bfloat16 if config.deepspeed.precision == "bf16" else torch.float32
        self.base_lr = optim.lr

    @property
    def module(self) -> torch.nn.Module:
        return self._engine.module

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self._engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self) -> None:
        self._engine.step()

    def train(self) -> None:
        self._engine.train()

    def close(self) -> None:
        """Release the engine: DeepSpeed's gradient hooks otherwise keep it (and its optimizer state) alive."""
        self._engine.destroy()

    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0]) if self.lr_scheduler else self.base_lr

    def grad_norm(self) -> float:
        return float(self._engine.get_global_grad_norm() or 0.0)

    def local_tensors(self) -> list[torch.Tensor]:
        """The parameter storage this rank holds, in parameter order (what an EMA of this rank tracks)."""
        return [local_tensor(p) for p in self.module.parameters()]

    def save(self, directory: str | Path, client_state: dict) -> None:
        """Every rank writes its shard (a collective)."""
        self._engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state=client_state)

    def load(self, directory: str | Path) -> dict:
        _, client_state = self._engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        return client_state or {}

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        """The whole model's weights in fp32 on the CPU at rank 0 (gathered from every rank under ZeRO-3, a
        collective), None on the other ranks."""
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None) \
            if self.zero3 else contextlib.nullcontext()
        with gather:
            if rank != 0:
                return None
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    def weights_fingerprint(self) -> float:
        """Sum of |w| over all parameters in float64: equal before a checkpoint and after its restore. A collective
        under ZeRO-3 (each rank holds a partition), local otherwise."""
        total = torch.zeros(1, dtype=torch.float64)
        for t in self.local_tensors():
            total += t.double().abs().sum().cpu()
        return float(all_reduce_host(total) if self.zero3 else total)

    def state_bytes(self) -> int:
        """Bytes this rank holds for parameters and optimizer state (fp32 master partitions, Adam moments): what
        ZeRO shards. Tensors are counted once by storage, so a partition that aliases a parameter is not counted
        twice."""
        seen: dict[int, int] = {}
        tensors = list(self.local_tensors())
        optimizer = self._engine.optimizer
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "bit16_groups_flat",
                     "fp32_groups_flat_partition"):
            tensors += list(getattr(optimizer, name, None) or [])
        base = getattr(optimizer, "optimizer", optimizer)
        tensors += [v for state in base.state.values() for v in state.values()]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())
