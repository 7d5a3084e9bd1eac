"""One rank of tests/test_train_deepspeed.py: a tiny Qwen3 trained by the one Trainer on the deepspeed backend.

Run under torchrun; writes to --out: batches_rank<R>.txt (the micro-batch indices each rank drew), and from
rank 0 the saved checkpoint (model/), history.jsonl and summary.json; rank 1 also writes the weights its
engine ended with (engine_rank1.safetensors), the engine's view that the checkpoint must equal.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fac.train.trainer import StageConfig, Trainer  # noqa: E402

VOCAB, LENGTH = 64, 16


def tiny_qwen3(seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return Qwen3ForCausalLM(config)


def synthetic_batch(index: int, batch_size: int) -> dict:
    """Counting sequences (start, stride drawn from the index): learnable, and a pure function of the index."""
    g = torch.Generator().manual_seed(index)
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=g)
    stride = torch.randint(1, 4, (batch_size, 1), generator=g)
    ids = (start + stride * torch.arange(LENGTH)) % VOCAB
    return {"input_ids": ids, "labels": ids.clone()}


def stage_config(zero_stage: int, steps: int, save_every: int = 10_000) -> StageConfig:
    return StageConfig(steps=steps, lr=1e-2, min_lr=1e-3, warmup_ratio=0.0, batch_size=4, grad_accum=2,
                       backend="deepspeed", zero_stage=zero_stage, save_every=save_every, log_every=1, seed=0)


def lm_loss(model, batch):
    return model(**batch).loss, {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero-stage", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-every", type=int, default=10_000)
    parser.add_argument("--crash-after-step", type=int, help="die when the step after this one starts")
    args = parser.parse_args()
    out = Path(args.out)
    cfg = stage_config(args.zero_stage, args.steps, args.save_every)
    model = tiny_qwen3(cfg.seed)
    drawn: list[int] = []

    def batch_fn(index: int) -> dict:
        if args.crash_after_step is not None and index >= args.crash_after_step * cfg.grad_accum * 2:
            raise RuntimeError(f"simulated crash at micro-batch {index}")
        drawn.append(index)
        return synthetic_batch(index, cfg.batch_size)

    trainer = Trainer(model, cfg, lm_loss, batch_fn, out / "state", "tiny")
    rank = trainer.rank
    try:
        summary = trainer.train()
    except SystemExit:
        (out / f"batches_rank{rank}.txt").write_text(" ".join(map(str, drawn)))
        if rank == 1 and args.zero_stage < 3:  # ZeRO 0-2: every rank's engine holds the full weights
            save_file({n: p.detach().clone() for n, p in model.named_parameters()},
                      str(out / "engine_rank1.safetensors"))
        raise
    (out / "batches_rank0.txt").write_text(" ".join(map(str, drawn)))
    model.save_pretrained(out / "model")
    (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in trainer.history))
    (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
