"""The DeepSpeed backend of the one trainer: how many processes a stage runs in, the launcher, and the engine.

`fac train` re-runs itself under torchrun when a deepspeed stage needs more than one process (one per GPU of
`gpus`, which CUDA must then have; `processes` CPU processes with gpus 0); every process then wraps the stage's
model, AdamW and schedule in a DeepSpeed engine with the stage's ZeRO stage.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from fac.devices import Placement, resolve

log = logging.getLogger("fac.train")


# -- how many processes, and the launcher ---------------------------------------------------------------------


def stage_placement(what: str, backend: str, gpus: int, precision: str) -> Placement:
    """This process's device and precision for a training stage: fac.devices.resolve's rule (gpus 0: CPU; gpus N:
    N CUDA devices required, this process on cuda:LOCAL_RANK; bf16/fp16 only on GPU), and the torch backend's one
    process on at most one GPU. Raises ValueError naming `what` when the machine cannot give what the stage asks."""
    if backend != "deepspeed" and int(gpus) > 1:
        raise ValueError(f"{what}: the torch backend trains in one process on at most one GPU; got gpus: {gpus} "
                         "(backend: deepspeed trains on several)")
    return resolve(what, gpus, precision, local_rank())


def process_count(stage: dict, what: str = "stage") -> int:
    """Processes a stage trains in: one per GPU when it asks for `gpus`, else `processes` on CPU; the torch backend
    always runs in one. Raises ValueError (stage_placement) when CUDA is missing or too small for the GPUs asked
    for, or the precision needs a GPU the stage does not ask for: never a silent fallback to CPU or fp32."""
    gpus, processes = int(stage.get("gpus", 0)), int(stage.get("processes", 1))
    stage_placement(what, stage.get("backend", "torch"), gpus, stage.get("precision", "fp32"))
    if stage.get("backend", "torch") != "deepspeed":
        return 1
    if processes < 1:
        raise ValueError(f"{what}: stage key 'processes' must be at least 1 (CPU processes); got {processes}")
    return gpus if gpus > 0 else processes


def launch_command(argv: list[str], processes: int) -> list[str]:
    """`fac <argv>` again, in `processes` processes under torchrun on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "fac", *argv]


def relaunch(stage: dict, argv: list[str], threads: int | None, what: str = "stage") -> None:
    """Become torchrun running `fac <argv>` when its stage needs several processes and this is not yet a worker.

    Returns only when this process should train by itself; raises ValueError naming `what` (process_count) when
    the stage asks for what this machine does not have. Replacing the process (rather than waiting on a
    child) lets a scheduler's signals reach torchrun, which passes them on to its workers.
    """
    if "WORLD_SIZE" in os.environ:
        return
    processes = process_count(stage, what)
    if processes == 1:
        return
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(max(1, threads // processes))
    command = launch_command(argv, processes)
    log.info("deepspeed stage: %d processes: %s", processes, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def threads_per_process(threads: int | None) -> int | None:
    """The job's cores shared among the processes torchrun started on this machine (at least 1 each)."""
    if threads is None:
        return None
    return max(1, int(threads) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


# -- ranks ----------------------------------------------------------------------------------------------------


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(on_gpu: bool) -> None:
    """nccl with one device per process on GPU, gloo on CPU; a lone process gets a group of one."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"
    import deepspeed

    if on_gpu:
        torch.cuda.set_device(local_rank())
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)


# -- the engine -----------------------------------------------------------------------------------------------


def deepspeed_config(cfg, on_gpu: bool) -> dict:
    """DeepSpeed's config from the stage: micro-batch, accumulation, clipping, ZeRO stage, precision on GPU."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3; got {cfg.zero_stage!r}")
    config = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
              "gradient_clipping": cfg.max_grad_norm, "zero_optimization": {"stage": cfg.zero_stage},
              "steps_per_print": 2**31 - 1}
    if on_gpu and cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif on_gpu and cfg.precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


class DeepSpeedBackend:
    """One process's DeepSpeed engine around the stage's model, optimizer and schedule.

    Every method is called by every rank (they are collectives) unless it says otherwise.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg, name: str):
        self.placement = stage_placement(f"stage {name}", "deepspeed", cfg.gpus, cfg.precision)
        self.on_gpu = self.placement.on_gpu
        init_process_group(self.on_gpu)
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.rank != 0:
            logging.getLogger("fac").setLevel(logging.WARNING)  # one readable log: rank 0's
        # The engine may cast and move the module; rank 0 keeps what does not train exactly as it was, to save.
        self.originals, self.dtypes = {}, {}
        if self.rank == 0:
            self.originals = {n: p.data for n, p in model.named_parameters() if not p.requires_grad}
            self.originals.update(model.named_buffers())
            self.dtypes = {n: p.dtype for n, p in model.named_parameters()}
        config = deepspeed_config(cfg, self.on_gpu)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=self.trainable,
                                                    optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.dtype = next(model.parameters()).dtype  # the training dtype, after the engine's cast
        # ZeRO's and the half-precision optimizers report the gradient norm; DeepSpeed's plain fp32 path does not.
        self.own_grad_norm = cfg.zero_stage == 0 and "bf16" not in config and "fp16" not in config
        self._grad_norm = float("nan")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_device(self, batch):
        """Tensors of a batch onto this process's device, floating ones in the training dtype."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.engine.device, self.dtype if batch.is_floating_point() else None)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def backward_step(self, loss: torch.Tensor) -> None:
        """One micro-batch: DeepSpeed scales by the accumulation and steps optimizer and schedule at its boundary."""
        self.engine.backward(loss)
        if self.own_grad_norm and self.engine.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self.trainable if p.grad is not None]  # averaged over ranks, not yet clipped
            self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()

    def mean_over_ranks(self, totals: dict[str, float]) -> dict[str, float]:
        keys = sorted(totals)
        values = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.engine.device)
        torch.distributed.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values.tolist())}

    def grad_norm(self) -> float:
        """The last optimizer step's gradient norm before clipping (over all ranks' gradients)."""
        if self.own_grad_norm:
            return self._grad_norm
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- resume state: DeepSpeed's own checkpoint (every rank's ZeRO partitions) plus the trainer's step --------
    def save(self, state_dir: Path, trainer_state: dict, history: list[dict]) -> None:
        """Write the resume point atomically: DeepSpeed saves under tag `tmp`, rank 0 renames it to `last`."""
        tmp, last, old = state_dir / "tmp", state_dir / "last", state_dir / "old"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        torch.distributed.barrier()
        self.engine.save_checkpoint(str(state_dir), tag="tmp", save_latest=False)
        torch.save({"torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                    "python_rng": random.getstate()}, tmp / f"rng_rank{self.rank}.pt")
        torch.distributed.barrier()
        if self.is_main:
            (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "world_size": self.world_size}))
            shutil.rmtree(old, ignore_errors=True)  # the leftover of a save killed while cleaning up
            if last.exists():
                last.rename(old)
            tmp.rename(last)
            shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    def load(self, state_dir: Path) -> tuple[int, list[dict]] | None:
        """The saved step and history after loading model, optimizer, schedule and RNG; None without a resume point."""
        last = state_dir / "last"
        if not (last / "trainer_state.json").is_file():
            last = state_dir / "old"  # a kill between save's two renames leaves only the previous point
            if not (last / "trainer_state.json").is_file():
                return None
        state = json.loads((last / "trainer_state.json").read_text())
        if state.get("world_size") != self.world_size:
            raise RuntimeError(f"{last}: resume point of {state.get('world_size')} processes, this run has "
                               f"{self.world_size}; delete {state_dir} to start over")
        path, _ = self.engine.load_checkpoint(str(state_dir), tag=last.name)
        if path is None:
            raise RuntimeError(f"{last}: DeepSpeed found no checkpoint to load; delete {state_dir} to start over")
        rng = torch.load(last / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch_rng"])
        np.random.set_state(rng["numpy_rng"])
        random.setstate(rng["python_rng"])
        history = [json.loads(line) for line in (last / "history.jsonl").read_text().splitlines() if line]
        return int(state["step"]), history

    # -- the end -------------------------------------------------------------------------------------------------
    def full_weights(self) -> dict[str, torch.Tensor]:
        """Rank 0: every trainable parameter's full fp32 weights gathered from all ranks, on CPU (others: {})."""
        from deepspeed.utils import safe_get_full_fp32_param

        weights = {}
        for name, param in self.engine.module.named_parameters():
            if not param.requires_grad:
                continue
            full = safe_get_full_fp32_param(param)  # a collective under ZeRO 1-3; None: the module holds the master
            if self.is_main:
                weights[name] = (param.data if full is None else full).detach().to("cpu", torch.float32).clone()
        return weights

    def finish(self) -> None:
        """Hand rank 0 back a plain CPU module with the final weights; every other rank's process ends here.

        The stage's code after training (saving, evaluating) thus runs once, on rank 0, as without DeepSpeed.
        """
        weights = self.full_weights()
        module = self.engine.module
        self.engine.destroy()  # removes ZeRO-3's hooks from the module
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if not self.is_main:
            raise SystemExit(0)
        for name, param in module.named_parameters():
            param.data = (weights[name].to(self.dtypes[name]) if name in weights else self.originals[name]).cpu()
        restore_buffers(module, self.originals)


def restore_buffers(module: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back the buffers the engine cast or moved (rotary tables, masks) as they were before training."""
    for prefix, sub in module.named_modules():
        for key in list(sub._buffers):
            name = f"{prefix}.{key}" if prefix else key
            if name in originals:
                sub._buffers[key] = originals[name].cpu()
