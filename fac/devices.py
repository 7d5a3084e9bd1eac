"""Where a job computes and in what precision: the params decide, never what the machine happens to have.

`gpus: 0` means CPU (even where CUDA is visible); `gpus: N > 0` means CUDA is required, N devices of it; precision
bf16 or fp16 needs a GPU. A job whose params and machine disagree fails at once with one line naming the job,
what it asked for and what it saw, instead of training or evaluating silently somewhere else or in fp32.

Training (fac.train), evaluation (fac.eval) and preference building use it; fac.model does not.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """One process's device and compute dtype: float32, or the autocast dtype of a GPU job in bf16/fp16."""

    device: torch.device
    dtype: torch.dtype
    on_gpu: bool

    def autocast(self):
        """torch.autocast in `dtype` on the GPU; a no-op in fp32 (weights and compute stay float32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


CPU = Placement(torch.device("cpu"), torch.float32, False)


def seen() -> str:
    """What this process sees of CUDA, for error messages."""
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    return (f"torch.cuda.is_available() is {available}, {count} CUDA device(s) visible, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}")


def resolve(what: str, gpus: int, precision: str = "fp32", local_rank: int = 0) -> Placement:
    """The placement of `what` (e.g. "stage prealign", "evaluation of stage2", "preferences"): `gpus` GPUs asked
    for (0: CPU), in `precision` (fp32, bf16, fp16); this process's device is cuda:`local_rank` on GPU.

    Raises ValueError naming `what` when CUDA is required but absent or too small, or a half precision is asked
    for on CPU. fp32 works everywhere.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{what}: precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    try:
        gpus = int(gpus)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: gpus must be a whole number (0: CPU); got {gpus!r}") from None
    if gpus < 0:
        raise ValueError(f"{what}: gpus must be 0 (CPU) or more; got {gpus}")
    if gpus == 0:
        if precision != "fp32":
            raise ValueError(f"{what}: precision {precision} needs a GPU, and gpus is 0; set precision: fp32 to run "
                             "on CPU (or gpus: 1 or more)")
        return CPU
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise ValueError(f"{what}: gpus: {gpus} asks for CUDA, but this process has none ({seen()}); "
                         "set gpus: 0 to run on CPU")
    if gpus > visible:
        raise ValueError(f"{what}: gpus: {gpus} asks for more CUDA devices than this process sees ({seen()}); "
                         "give the job that many, or fewer gpus (set gpus: 0 to run on CPU)")
    if not 0 <= local_rank < gpus:
        raise ValueError(f"{what}: process of local rank {local_rank} has no GPU of the {gpus} asked for")
    return Placement(torch.device("cuda", local_rank), PRECISIONS[precision], True)


def device_of(module: torch.nn.Module) -> torch.device:
    """The device a module's (first) parameter lives on: where its inputs must go."""
    return next(module.parameters()).device


def to_device(batch, device: torch.device):
    """Tensors of a (nested) dict, list or tuple on `device`; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
