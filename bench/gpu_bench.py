"""GPU benchmark (run by hand on a CUDA machine; CI has none): training-step throughput and model FLOPs
utilisation of the 5 Hz backbone (k=5) against the 25 Hz backbone (k=1), then the GPU checks of gpu_check.py.

Per group size (default 5 then 1; ratios are first / second), a fresh model of the chosen geometry with fp32
weights trains on ONE conversation (bench_compute's batch: --minutes, default 6, half user speech as log-mel
features, half assistant speech tokens with their transcript, in 6 exchanges): a step is forward + backward +
AdamW step, in bf16 autocast (--precision bf16) or plain fp32. Reported:
- step time: median (and min) over --steps timed steps after --warmup untimed ones, each ended by
  torch.cuda.synchronize();
- throughput: LLM tokens/s (LLM positions per step / median step time), speech tokens/s (25 Hz positions the
  SRH predicts over) and conversation seconds per second (the only one comparable across k);
- MFU = counted training FLOPs per step / median step time / the device's dense bf16 peak. The FLOPs are those
  bench_compute counts for the same geometry and batch on the meta device (forward + backward of matmuls,
  convolutions and attention; the optimizer is not counted). The peak comes from a table of known GPUs by
  torch.cuda.get_device_name (H200, H100 SXM/H800 989, H100 NVL 835, H100 PCIe 756, A100/A800 312, L40S 362, L40
  181, L4 121, B200 2250 TFLOPs) or --peak-tflops; with neither (a CPU, an unknown GPU) MFU is not computed;
- peak CUDA memory allocated during the steps.
Then, unless --skip-checks, gpu_check.conformance() and gpu_check.training() (the official fixture reproduced on
CUDA in fp32; bf16 training lowers the loss; a resumed run ends where an uninterrupted one does); they need CUDA.

Geometries: "0.5b" (default), a Qwen3-0.6B-like LLM shortened to 24 layers (hidden 1024, 16 heads of 64, 8 KV
heads, MLP 3072, vocabulary 151936, tied embeddings), a Whisper-small-like encoder (80 mels, 768 x 12 layers, 12
heads, FFN 3072), the paper's 6564-code speech codebook and a small SRH (Qwen3, hidden 512 x 6 layers, 8 heads of
64, 4 KV heads, MLP 1536): 0.58B parameters at k=5 (LLM 0.458B, encoder 0.088B, SRH 0.032B, speech-token encoder
0.009B). "tiny": the embedded default's model (bench_compute.tiny_params), for a smoke test on the CPU, where
--minutes defaults to 0.25.

    python bench/gpu_bench.py                                       # 0.5b, k=5 vs k=1, bf16, then the GPU checks
    python bench/gpu_bench.py --steps 20 --warmup 5 --skip-checks --minutes 3
    python bench/gpu_bench.py --device cpu --geometry tiny --precision fp32 --skip-checks --steps 2 --warmup 1 \\
        --peak-tflops 1                                             # smoke test, seconds
Results: bench/results/gpu_bench.json (settings, device, per-k numbers, ratios, check failures).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import bench_compute  # noqa: E402
from fac.model import build_config  # noqa: E402
from fac.model.builders import PAPER_SPECIAL_IDS  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s), most specific name first (get_device_name: "NVIDIA H100 80GB HBM3", ...).
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("B200", 2250e12),
]


def params_05b(group_size: int) -> dict:
    """The `build_config` dict of the ~0.5B geometry (see the module docstring)."""
    return {
        "llm": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
                "head_dim": 64, "intermediate_size": 3072, "vocab_size": 151936, "rope_theta": 1_000_000.0,
                "max_position_embeddings": 40960, "tie_word_embeddings": True},
        "encoder": {"num_mel_bins": 80, "d_model": 768, "encoder_layers": 12, "encoder_attention_heads": 12,
                    "encoder_ffn_dim": 3072, "n_window": 100, "max_source_positions": 1500},
        "speech": {"codebook_size": 6564, "group_size": group_size,
                   "bos_token_id": 6561, "eos_token_id": 6562, "pad_token_id": 6563},
        "srh": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
                "head_dim": 64, "intermediate_size": 1536, "rope_theta": 1_000_000.0},
        "special_ids": dict(PAPER_SPECIAL_IDS),
    }


GEOMETRIES = {"0.5b": params_05b, "tiny": bench_compute.tiny_params}


def peak_flops(device: str, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, flops in PEAK_BF16_FLOPS:
            if key in name:
                return flops, f"table: {key} (dense bf16)"
        return None, f"unknown GPU {name!r}: give --peak-tflops"
    return None, "no peak for a CPU: give --peak-tflops"


def run_one(args, group_size: int, peak: float | None) -> dict:
    config = build_config(GEOMETRIES[args.geometry](group_size))
    batch, layout = bench_compute.conversation(config, args.minutes, args.turns)
    lengths = bench_compute.sequence_lengths(config, batch)
    # FLOPs of one step, counted on the meta device (no memory, the same sizes)
    counted = bench_compute.measure_step(bench_compute.build_model(config, "meta"), batch)
    flops = counted["step_flops"]["total"]

    torch.manual_seed(0)
    model = bench_compute.build_model(config, args.device)  # fp32 master weights, training mode
    device_batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    cuda = args.device == "cuda"

    def step() -> float:
        with autocast:
            loss = model(**device_batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {
        "group_size": group_size, **lengths, "layout": layout,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": times, "step_seconds_median": median, "step_seconds_min": min(times),
        "losses": losses,
        "llm_tokens_per_second": lengths["llm_sequence_length"] / median,
        "speech_tokens_per_second": lengths["srh_sequence_length"] / median,
        "conversation_seconds_per_second": 60.0 * args.minutes / median,
        "train_step_flops": flops, "train_step_flops_by_component": counted["step_flops"],
        "achieved_tflops": flops / median / 1e12,
        "mfu": flops / median / peak if peak else None,
    }
    if cuda:
        result["cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model, optimizer, device_batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_checks() -> list[str]:
    """gpu_check's conformance and training/resume checks; their failures by name."""
    import gpu_check

    return gpu_check.conformance() + gpu_check.training()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--geometry", default="0.5b", choices=sorted(GEOMETRIES))
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[5, 1], help="first is the numerator of ratios")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per group size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, AdamW state)")
    parser.add_argument("--minutes", type=float, help="length of the conversation (default 6; tiny: 0.25)")
    parser.add_argument("--turns", type=int, default=6, help="user + assistant exchanges in it")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: from the GPU table)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-checks", action="store_true", help="do not run gpu_check's checks afterwards")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_bench.json")
    args = parser.parse_args(argv)
    if args.minutes is None:
        args.minutes = 0.25 if args.geometry == "tiny" else 6.0
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (use --device cpu for a smoke test)")
    if args.steps < 1:
        sys.exit("gpu_bench: --steps must be at least 1")
    torch.set_num_threads(args.threads)
    peak, peak_source = peak_flops(args.device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__} on {device_name}; peak {peak / 1e12 if peak else '-'} TFLOP/s ({peak_source}); "
          f"{args.geometry}, {args.precision}, one {args.minutes:g}-minute conversation")

    results = [run_one(args, k, peak) for k in args.group_sizes]
    print(f"parameters: {results[0]['parameters'] / 1e9:.3f}B at k={results[0]['group_size']}")
    print(f"{'k':>3} {'LLM len':>8} {'SRH len':>8} {'step ms':>9} {'min ms':>9} {'LLM tok/s':>10} "
          f"{'speech tok/s':>13} {'conv s/s':>9} {'TFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>7} {'peak GB':>8}")
    for r in results:
        mfu = f"{100 * r['mfu']:>6.2f}%" if r["mfu"] is not None else f"{'-':>7}"
        memory = f"{r['cuda_peak_allocated_gb']:>8.2f}" if "cuda_peak_allocated_gb" in r else f"{'-':>8}"
        print(f"{r['group_size']:>3} {r['llm_sequence_length']:>8} {r['srh_sequence_length']:>8} "
              f"{1000 * r['step_seconds_median']:>9.1f} {1000 * r['step_seconds_min']:>9.1f} "
              f"{r['llm_tokens_per_second']:>10.0f} {r['speech_tokens_per_second']:>13.0f} "
              f"{r['conversation_seconds_per_second']:>9.1f} {r['train_step_flops'] / 1e12:>11.3f} "
              f"{r['achieved_tflops']:>8.2f} {mfu} {memory}")
    ratios = {}
    if len(results) >= 2:
        a, b = results[0], results[1]
        ratios = {name: a[name] / b[name] for name in
                  ("step_seconds_median", "step_seconds_min", "conversation_seconds_per_second", "train_step_flops",
                   "llm_tokens_per_second")}
        if a["mfu"] is not None:
            ratios["mfu"] = a["mfu"] / b["mfu"]
        if "cuda_peak_allocated_gb" in a:
            ratios["cuda_peak_allocated"] = a["cuda_peak_allocated_gb"] / b["cuda_peak_allocated_gb"]
        listing = ", ".join(f"{name} {value:.3f}" for name, value in ratios.items())
        print(f"\nratios k{a['group_size']}/k{b['group_size']}: {listing}")

    checks: dict = {"run": False, "failures": []}
    if args.skip_checks:
        checks["note"] = "skipped (--skip-checks)"
    elif args.device != "cuda":
        checks["note"] = "skipped: gpu_check needs CUDA"
        print("\ngpu_check: skipped, it needs CUDA")
    else:
        print("\ngpu_check: conformance and training/resume on the GPU")
        checks = {"run": True, "failures": run_checks()}
        print("FAILED: " + ", ".join(checks["failures"]) if checks["failures"] else "all GPU checks passed")

    record = {
        "benchmark": "training step on the device, grouping k (gpu_bench)",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": {"name": device_name, "peak_flops": peak, "peak_source": peak_source, "torch": torch.__version__,
                   "cuda": torch.version.cuda},
        "mfu_method": "bench_compute's training-step FLOPs (meta device, same geometry and batch) / median step "
                      "time / peak; the optimizer step is timed but not counted",
        "results": results,
        "ratios": ratios,
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {args.out}")
    return record


if __name__ == "__main__":
    record = main()
    sys.exit(1 if record["checks"]["failures"] else 0)
