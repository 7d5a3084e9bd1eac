"""One process of tests/test_devices.py's DPO reference check: `train_dpo` up to its reference log-probs.

Run by itself (one process) or under torchrun (WORLD_SIZE > 1). The Trainer is replaced by a stand-in that trains
nothing and, like the DeepSpeed backend's finish, ends every rank but 0; its `finish` keeps the stage's state folder,
so reference_logps.json stays for the test to read. Writes to --out: ref_rank<R>.json (the reference log-probs rank R
ended with), writes_rank<R>.txt (how many times rank R wrote reference_logps.json) and placement_rank<R>.json (where
the reference pass ran: the device of the model's inputs, and the autocast dtype, if any).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fac.train import dpo  # noqa: E402


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class NoTraining:
    """The Trainer's interface, training nothing; rank 0 goes on to save, the other ranks end (as after DeepSpeed)."""

    def __init__(self, model, cfg, loss_fn, batch_fn, state_dir, name, run_info=None):
        self.history: list[dict] = []

    def train(self) -> dict:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            if int(os.environ.get("RANK", 0)) != 0:
                raise SystemExit(0)
        return {"stage": "dpo"}

    def finish(self) -> None:
        pass  # keep reference_logps.json


def main() -> None:
    parser = argparse.ArgumentParser()
    for opt in ("--out", "--model", "--pairs", "--data-root", "--state-root", "--stage"):
        parser.add_argument(opt, required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    writes, seen = [], {}
    write_reference, cached_reference, sequence_logps = dpo.write_reference, dpo.cached_reference, dpo.sequence_logps

    def counted_write(ref_file, values):
        writes.append(str(ref_file))
        write_reference(ref_file, values)

    def recorded(*a, **k):
        values = cached_reference(*a, **k)
        (out / f"ref_rank{rank()}.json").write_text(json.dumps(values))
        (out / f"writes_rank{rank()}.txt").write_text(str(len(writes)))
        (out / f"placement_rank{rank()}.json").write_text(json.dumps(seen))
        return values

    def spied_logps(model, batch, reduce="sum"):
        if not model.training:  # the reference pass (the model in eval mode)
            seen.update(device=str(batch["input_ids"].device),
                        autocast=str(torch.get_autocast_dtype("cuda")) if torch.is_autocast_enabled("cuda") else None,
                        weights=str(next(model.parameters()).dtype))
        return sequence_logps(model, batch, reduce)

    dpo.write_reference, dpo.cached_reference, dpo.sequence_logps = counted_write, recorded, spied_logps
    dpo.Trainer = NoTraining
    dpo.train_dpo(json.loads(args.stage), args.model, args.pairs, args.data_root, str(out / "model"),
                  args.state_root, {})


if __name__ == "__main__":
    main()
