"""Benchmark the mel encoder's length buckets: one training step (forward, backward, AdamW) of the continuous
encoder at the embedded default's geometry (params/default.yaml `model.encoder`) on batches shaped like the tiny
world's encoder batches (32 clips of 1.6-3.1 s, the range of its ASR training clips, log-mels at 100 frames/s),
with the chunks of a batch run in one padded batch (`chunk_buckets` 1, as before) against length buckets
(the default, `FunAudioChatContinuousEncoder.chunk_buckets`). Both give the same outputs and gradients
(tests/test_model_components.py); this measures what the padding they skip cost.

    .venv/bin/python bench/bench_encoder.py [--threads 1] [--rounds 3] [--batches 8]

Prints the median and minimum step time per setting and their ratio, and the share of padded frames; writes
bench/results/encoder_buckets.json.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from fac.model.configuration import FunAudioChatAudioConfig  # noqa: E402
from fac.model.encoder import FunAudioChatContinuousEncoder, length_buckets  # noqa: E402


def padding_share(lengths: list[list[int]], chunk: int, buckets: int) -> float:
    """Share of the frames the encoder computes that are padding, over batches of clip lengths."""
    real = padded = 0
    for batch in lengths:
        chunks = [min(chunk, n - start) for n in batch for start in range(0, n, chunk)]
        real += sum(chunks)
        padded += sum(len(g) * max(chunks[i] for i in g) for g in length_buckets(chunks, buckets))
    return 1 - real / padded


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the two settings")
    parser.add_argument("--batches", type=int, default=8, help="timed steps per setting and round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, nargs=2, default=[1.6, 3.1], help="clip length range")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encoder_buckets.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    enc = yaml.safe_load((ROOT / "params/default.yaml").read_text())["model"]["encoder"]
    config = FunAudioChatAudioConfig(**enc, output_dim=128)
    torch.manual_seed(0)
    tower = FunAudioChatContinuousEncoder(config).train()
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    low, high = (int(100 * s) for s in args.seconds)
    lengths = [torch.randint(low, high + 1, (args.batch_size,), generator=gen).tolist() for _ in range(args.batches)]
    batches = []
    for batch in lengths:
        feats = torch.randn(len(batch), config.num_mel_bins, max(batch), generator=gen)
        mask = (torch.arange(max(batch))[None, :] < torch.tensor(batch)[:, None]).long()
        batches.append((feats, mask, max(batch) // 4 + 1))
    settings = {"one padded batch": 1, "length buckets": FunAudioChatContinuousEncoder.chunk_buckets}
    times = {name: [] for name in settings}
    for _ in range(args.rounds + 1):  # the first round warms up and is not kept
        for name, buckets in settings.items():
            FunAudioChatContinuousEncoder.chunk_buckets = buckets
            for feats, mask, out_len in batches:
                start = time.perf_counter()
                tower(feats, mask, out_len).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - start)
    FunAudioChatContinuousEncoder.chunk_buckets = settings["length buckets"]
    chunk = 2 * config.n_window
    record = {"settings": vars(args) | {"out": str(args.out)}, "encoder": enc,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    print(f"{'setting':>18} {'buckets':>8} {'padding':>8} {'step ms (median)':>17} {'min':>8}")
    for name, buckets in settings.items():
        kept = times[name][args.batches:]
        record[name] = {"buckets": buckets, "padding_share": padding_share(lengths, chunk, buckets),
                        "step_seconds_median": statistics.median(kept), "step_seconds_min": min(kept)}
        r = record[name]
        print(f"{name:>18} {buckets:>8} {r['padding_share']:>8.3f} {1000 * r['step_seconds_median']:>17.1f} "
              f"{1000 * r['step_seconds_min']:>8.1f}")
    a, b = record["length buckets"], record["one padded batch"]
    record["ratio"] = {"median": a["step_seconds_median"] / b["step_seconds_median"],
                       "min": a["step_seconds_min"] / b["step_seconds_min"]}
    print(f"\nratio length buckets / one padded batch: median {record['ratio']['median']:.3f}, "
          f"min {record['ratio']['min']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
