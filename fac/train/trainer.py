"""The one trainer: every stage (base LLM, encoder, pre-alignment, stage 1/2, DPO) is a configuration of it.

A stage differs only by its model, trainable parameters, data (a batch function of the step), schedule and
loss. Resume state lives where no rule declares it and is keyed by a fingerprint of the stage, so a killed
run resumes exactly (same batches, same RNG) and a changed stage never resumes stale state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from fac import faults
from fac.atomic import named_failure

log = logging.getLogger("fac.train")

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
BatchFn = Callable[[int], dict]


@dataclass
class StageConfig:
    """The params slice of one stage (see workflow/schemas/params.schema.yaml, $defs/stage)."""

    steps: int
    lr: float
    min_lr: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    batch_size: int = 8
    grad_accum: int = 1
    trainable: list[str] = field(default_factory=lambda: [""])
    data: dict = field(default_factory=dict)
    precision: str = "fp32"
    backend: str = "torch"
    zero_stage: int = 0
    gpus: int = 0
    save_every: int = 100
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 10
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: dict) -> "StageConfig":
        known = set(cls.__dataclass_fields__) - {"extra"}
        if "steps" not in params:
            raise ValueError(f"stage params need 'steps' (optimizer steps); got keys {sorted(params)}")
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs["extra"] = {k: v for k, v in params.items() if k not in known}
        return cls(**kwargs)


def set_trainable(model: torch.nn.Module, prefixes: list[str]) -> tuple[int, int]:
    """Freeze every parameter whose name starts with none of `prefixes` ("" = everything trains)."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in prefixes if not any(name.startswith(p) for name in names)]
    if unmatched:
        tops = sorted({name.split(".")[0] for name in names})
        raise ValueError(f"trainable prefixes {unmatched} match no parameter of {type(model).__name__} "
                         f"(misspelt? its modules are {tops})")
    trainable = total = 0
    for name, param in model.named_parameters():
        param.requires_grad = any(name.startswith(p) for p in prefixes)
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def to_device(batch, device):
    """A batch's tensors on `device` (fac.devices.to_device); the batch itself when device is None (CPU training)."""
    from fac.devices import to_device as on_device

    return batch if device is None else on_device(batch, device)


def fingerprint(*parts) -> str:
    """A short hash of everything that decides a stage's result (params, inputs' identities)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def files_identity(*paths) -> str:
    """Content hash of input files (text, manifests, tokenizer; all small), for resume fingerprints."""
    digest = hashlib.sha1()
    for path in paths:
        digest.update(str(path).encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def step_rng(seed: int, step: int) -> random.Random:
    """The data RNG of one micro-step: batches depend on (seed, step) only, so resuming replays them."""
    return random.Random(seed * 1_000_003 + step)


class EpochOrder:
    """Batches as passes over a stage's data without replacement (stages given `epochs` rather than `steps`).

    Pass e is a permutation of range(n) seeded by (seed, e); the passes are laid end to end and micro-batch g takes
    positions [g * batch_size, (g + 1) * batch_size). A batch is a pure function of (seed, g), so a resumed run
    replays it, and ranks (which take different g) never draw the same position.
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("a pass over no examples: the stage's data is empty")
        self.n, self.seed = n, seed
        self._passes: dict[int, list[int]] = {}

    def _pass(self, epoch: int) -> list[int]:
        if epoch not in self._passes:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + 7_919 * epoch + 1).shuffle(order)
            self._passes = {epoch: order}  # one pass at a time: a run walks them in order
        return self._passes[epoch]

    def take(self, micro_step: int, batch_size: int) -> list[int]:
        start = micro_step * batch_size
        return [self._pass(p // self.n)[p % self.n] for p in range(start, start + batch_size)]


def packed_tokens(position_ids: torch.Tensor) -> int:
    """Tokens of a packed batch (no attention mask: positions restart at 0 per conversation, padding is 0): every
    nonzero position, plus each conversation's first (a 0 followed by a 1)."""
    starts = (position_ids[:, :-1] == 0) & (position_ids[:, 1:] == 1)
    return int((position_ids != 0).sum() + starts.sum())


def epoch_mode(stage: dict) -> bool:
    """True when a stage counts its training in passes over its data (`epochs`) and gives no `steps`."""
    return "epochs" in stage and "steps" not in stage


class Trainer:
    """Runs one stage: `steps` optimizer steps of `grad_accum` micro-batches, with periodic resume points."""

    def __init__(self, model: torch.nn.Module, cfg: StageConfig, loss_fn: LossFn, batch_fn: BatchFn,
                 state_dir: str | Path, name: str, run_info: dict | None = None):
        self.model, self.cfg, self.loss_fn, self.batch_fn = model, cfg, loss_fn, batch_fn
        self.state_dir = Path(state_dir)
        self.name = name
        self.run_info = run_info or {}
        if cfg.backend not in ("torch", "deepspeed"):
            raise ValueError(f"{name}: backend must be 'torch' or 'deepspeed'; got {cfg.backend!r}")
        from fac.train.distributed import stage_placement

        # The stage's gpus and precision decide (fac.devices.resolve): gpus 0 trains on CPU in fp32, gpus 1 on the
        # GPU (weights and optimizer state in fp32, the forward under autocast for bf16/fp16); a machine that cannot
        # give what the stage asks for is a ValueError here, before anything trains. DeepSpeed places the model.
        self.placement = stage_placement(f"stage {name}", cfg.backend, cfg.gpus, cfg.precision)
        self.device = self.placement.device if cfg.backend == "torch" and self.placement.on_gpu else None
        if self.device is not None:
            model.to(self.device)
        fp16 = self.device is not None and self.placement.dtype == torch.float16
        self.grad_scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.trainable, self.total = set_trainable(model, cfg.trainable)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = int(round(cfg.warmup_ratio * cfg.steps))
        if cfg.schedule == "cosine":
            self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
                self.optimizer, num_warmup_steps=warmup, num_training_steps=cfg.steps, min_lr=cfg.min_lr)
        else:
            self.scheduler = get_constant_schedule_with_warmup(self.optimizer, num_warmup_steps=warmup)
        self.ds = None  # the DeepSpeed engine's process when backend is deepspeed
        if cfg.backend == "deepspeed":
            from fac.train.distributed import DeepSpeedBackend

            self.ds = DeepSpeedBackend(model, self.optimizer, self.scheduler, cfg, name)
        self.rank, self.world_size = (self.ds.rank, self.ds.world_size) if self.ds else (0, 1)
        self.step = 0
        self.history: list[dict] = []

    # -- resume state -----------------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.state_dir / "last"

    def save_state(self) -> None:
        """Write the resume point atomically: a killed save leaves the previous one intact."""
        if self.ds is not None:
            self.ds.save(self.state_dir, {"step": self.step, "stage": self.name}, self.history)
            return
        tmp = self.state_dir / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        last = self._state_path()
        with named_failure(last, tmp):  # a full disk: tmp removed, the previous point kept, the error names it
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(dedupe_shared(state), str(tmp / "model.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if self.device is not None else None,
                        "python_rng": random.getstate()}, tmp / "optim.pt")
            (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))
            (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step, "stage": self.name}))
        old = self.state_dir / "old"
        shutil.rmtree(old, ignore_errors=True)  # the leftover of a save killed while cleaning up
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
        faults.point(f"saved.{self.name}")

    def load_state(self) -> bool:
        if self.ds is not None:
            resumed = self.ds.load(self.state_dir)
            if resumed is not None:
                self.step, self.history = resumed
            return resumed is not None
        last = self._state_path()
        if not (last / "trainer_state.json").is_file():
            # A kill between save_state's two renames leaves only the previous point, in old/.
            last = self.state_dir / "old"
            if not (last / "trainer_state.json").is_file():
                return False
        state = load_file(str(last / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if k not in shared_aliases(self.model)]
        if real_missing or unexpected:
            raise RuntimeError(f"{last}: resume state does not fit the model (missing {real_missing[:3]}, "
                               f"unexpected {unexpected[:3]}); delete {self.state_dir} to start over")
        extra = torch.load(last / "optim.pt", weights_only=False, map_location="cpu")
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])
        if self.device is not None and extra.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(extra["cuda_rng"])
        np.random.set_state(extra["numpy_rng"])
        random.setstate(extra["python_rng"])
        self.history = [json.loads(line) for line in (last / "history.jsonl").read_text().splitlines() if line]
        self.step = json.loads((last / "trainer_state.json").read_text())["step"]
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        if self.load_state():
            log.info("%s: resuming from step %d (%s)", self.name, self.step, self._state_path())
        else:
            log.info("%s: starting; %d of %d parameters train (%s)", self.name, self.trainable, self.total,
                     ", ".join(p or "<all>" for p in cfg.trainable))
        wandb_run = start_wandb(self.name, cfg, self.run_info) if self.rank == 0 else None
        self.model.train()
        started = time.time()
        step_times = []
        tokens = 0  # LLM input tokens (attention_mask) of this process's micro-batches, for tokens/s
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, unit="step", disable=self.rank != 0)
        while self.step < cfg.steps:
            t0 = time.time()
            totals: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                # Every rank its own micro-batches, a pure function of (step, rank): resuming replays them.
                batch = self.batch_fn((self.step * cfg.grad_accum + micro) * self.world_size + self.rank)
                if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
                    tokens += int(batch["attention_mask"].sum())
                elif isinstance(batch, dict) and isinstance(batch.get("position_ids"), torch.Tensor):
                    tokens += packed_tokens(batch["position_ids"])
                if self.ds is None:
                    with self.placement.autocast():
                        loss, parts = self.loss_fn(self.model, to_device(batch, self.device))
                else:
                    loss, parts = self.loss_fn(self.ds.engine, self.ds.to_device(batch))
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{self.name}: loss is {loss.item()} at step {self.step}; lower the lr "
                                       "or check the data")
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(loss / cfg.grad_accum).backward()
                elif self.ds is None:
                    (loss / cfg.grad_accum).backward()
                else:
                    self.ds.backward_step(loss)  # optimizer and schedule step at the accumulation boundary
                for key, value in {"loss": loss.item(), **parts}.items():
                    totals[key] = totals.get(key, 0.0) + float(value) / cfg.grad_accum
            if self.ds is None:
                if self.grad_scaler is not None:
                    self.grad_scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
                if self.grad_scaler is not None:
                    self.grad_scaler.step(self.optimizer)
                    self.grad_scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            else:
                grad_norm, totals = self.ds.grad_norm(), self.ds.mean_over_ranks(totals)
            self.step += 1
            step_times.append(time.time() - t0)
            record = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      **{k: round(v, 6) for k, v in totals.items()}}
            self.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                log.info("%s step %d/%d %s", self.name, self.step, cfg.steps,
                         " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
                if wandb_run is not None:
                    wandb_run.log(record, step=self.step)
            if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_state()
        bar.close()
        if wandb_run is not None:
            wandb_run.finish()
        wall = time.time() - started
        summary = {"stage": self.name, "steps": cfg.steps, "wall_seconds": round(wall, 2),
                   "step_seconds_mean": round(float(np.mean(step_times)), 4) if step_times else None,
                   "tokens_per_second": (round(tokens * self.world_size / sum(step_times), 1)
                                         if tokens and step_times else None),
                   "trainable_parameters": self.trainable, "total_parameters": self.total,
                   "final": self.history[-1] if self.history else None}
        if self.ds is not None:
            summary["processes"] = self.world_size
            self.ds.finish()  # rank 0 goes on with the full weights in self.model; other ranks end here
        return summary

    def finish(self) -> None:
        """Forget the resume state once the final checkpoint is safely written."""
        shutil.rmtree(self.state_dir, ignore_errors=True)


def shared_aliases(model: torch.nn.Module) -> set[str]:
    """Names of state-dict entries that are the same tensor as an earlier entry (tied weights)."""
    seen, aliases = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if key in seen:
            aliases.add(name)
        else:
            seen[key] = name
    return aliases


def dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep the first name of every tied tensor."""
    seen, out = set(), {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def start_wandb(name: str, cfg: StageConfig, run_info: dict):
    """An offline wandb run grouped by experiment with the stage as job type (WANDB_MODE=disabled: none)."""
    if os.environ.get("WANDB_MODE", "offline") == "disabled" or not run_info.get("wandb_dir"):
        return None
    import wandb

    Path(run_info["wandb_dir"]).mkdir(parents=True, exist_ok=True)
    return wandb.init(project="fac", group=run_info.get("experiment", "default"), job_type=name, name=name,
                      dir=run_info["wandb_dir"], config={k: v for k, v in cfg.__dict__.items()},
                      mode=os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous")


def cosine_lr(step: int, cfg: StageConfig) -> float:
    """The schedule in closed form (used by tests to check the scheduler the trainer builds)."""
    warmup = int(round(cfg.warmup_ratio * cfg.steps))
    if step < warmup:
        return cfg.lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
