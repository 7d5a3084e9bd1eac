"""Benchmark the paper's compute claim for grouping: training-step time and memory of the 5 Hz backbone (k=5)
against the 25 Hz backbone (k=1) on the same batch of speech conversations, tiny config, CPU by default.

Each group size runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own. Reported per k:
step time (forward + backward + AdamW step; median and min over timed repeats after warm-up), peak RSS increase
over the process's RSS just before the first step, bytes of activations saved for backward (autograd saved-tensor
hooks, parameters excluded, each storage counted once), FLOPs of one step (torch.utils.flop_counter), and forward
FLOPs per sub-module: "backbone" = speech-token encoder + LLM + SRH, the part whose sequence grouping shortens.

    .venv/bin/python bench/bench_grouping.py [--repeats 5] [--warmup 2] [--rounds 2] [--threads 1] [--group-sizes 5 1]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fac.model import FunAudioChatForConditionalGeneration, build_config  # noqa: E402
from fac.model.processing import SpecialIds, build_example, collate  # noqa: E402

VOCAB = 1040  # a 1024-token BPE plus special tokens, as in the tiny world
SPECIAL = {"pad": 1024, "eos": 1026, "audio": 1027, "audio_bos": 1028, "audio_eos": 1029, "sil": 1030}
TEMPLATE = dict(system_prefix=[1025, 1, 10], user_prefix=[1025, 2, 10], assistant_prefix=[1025, 3, 10],
                turn_suffix=[1026, 10])


def tiny_params(group_size: int, llm_hidden: int = 128, llm_layers: int = 4) -> dict:
    """The embedded default's model size (LLM hidden 128 x 4 layers), with the given group size; a larger LLM
    (4 heads of hidden/4, MLP 3x hidden) moves the compute share towards the paper's, where the LLM dominates."""
    return {
        "llm": {"hidden_size": llm_hidden, "num_hidden_layers": llm_layers, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": llm_hidden // 4, "intermediate_size": 3 * llm_hidden,
                "vocab_size": VOCAB, "rope_theta": 10000},
        "encoder": {"num_mel_bins": 80, "d_model": 192, "encoder_layers": 4, "encoder_attention_heads": 4,
                    "encoder_ffn_dim": 768, "n_window": 50, "max_source_positions": 1500},
        "speech": {"codebook_size": 260, "group_size": group_size},
        "srh": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "intermediate_size": 192},
        "special_ids": dict(SPECIAL),
    }


def make_batch(config, conversations: int, user_seconds: float, assistant_seconds: float, seed: int) -> dict:
    """Conversations of about `user_seconds` of user audio and `assistant_seconds` of assistant speech (lengths
    jittered by up to 10%); the data are identical for every group size."""
    gen = torch.Generator().manual_seed(seed)
    ids = SpecialIds.from_config(config, **TEMPLATE)
    examples = []
    for _ in range(conversations):
        jitter = 0.9 + 0.1 * torch.rand(2, generator=gen)
        frames = int(user_seconds * 100 * jitter[0])
        codes = int(assistant_seconds * 25 * jitter[1])
        text = torch.randint(11, 1000, (max(1, codes // 8),), generator=gen).tolist()  # ~3 words per second
        examples.append(build_example(
            torch.randint(11, 1000, (12,), generator=gen).tolist(),
            torch.randn(config.audio_config.num_mel_bins, frames, generator=gen),
            text, torch.randint(0, 256, (codes,), generator=gen).tolist(), ids, config.audio_config.group_size,
        ))
    return collate(examples, ids)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def saved_activation_mb(model, batch) -> float:
    """Megabytes of tensors autograd keeps for backward in one forward (parameters excluded, storages once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


def forward_gflops_by_component(model, batch) -> dict[str, float]:
    """Forward FLOPs of each top-level sub-module (module attribution is exact in forward, not in backward)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return {name: sum(counts.get(f"{root}.{name}", {}).values()) / 1e9 for name, _ in model.named_children()}


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = build_config(tiny_params(args.group_size, args.llm_hidden, args.llm_layers))
    model = FunAudioChatForConditionalGeneration(config).train().to(args.device)
    batch = make_batch(config, args.conversations, args.user_seconds, args.assistant_seconds, seed=1)
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()

    rss_before = rss_mb()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
    with FlopCounterMode(display=False) as flops:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    by_component = forward_gflops_by_component(model, batch)
    result = {
        "group_size": args.group_size,
        "llm_sequence_length": int(batch["input_ids"].shape[1]),
        "audio_positions": int((batch["input_ids"] == SPECIAL["audio"]).sum()),
        "srh_sequence_length": int(batch["input_ids"].shape[1]) * args.group_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": times,
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        "peak_rss_mb": peak_rss,
        "peak_rss_increase_mb": peak_rss - rss_before,
        "saved_activations_mb": saved_activation_mb(model, batch),
        "train_step_gflops": flops.get_total_flops() / 1e9,
        "forward_gflops_by_component": by_component,
        # what grouping changes: the speech-token encoder, the LLM and the SRH (the mel encoder is the same for any k)
        "backbone_forward_gflops": sum(v for k, v in by_component.items() if k != "continuous_audio_tower"),
    }
    if args.device == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps per group size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, optimizer state)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the group sizes")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[5, 1], help="first is the numerator of ratios")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--user-seconds", type=float, default=6.0)
    parser.add_argument("--assistant-seconds", type=float, default=4.0)
    parser.add_argument("--llm-hidden", type=int, default=128, help="LLM hidden size (default: the tiny default)")
    parser.add_argument("--llm-layers", type=int, default=4, help="LLM layers (default: the tiny default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grouping.json")
    parser.add_argument("--group-size", type=int, help=argparse.SUPPRESS)  # internal: run one worker
    args = parser.parse_args()

    if args.group_size is not None:
        print(json.dumps(worker(args)))
        return

    # Rounds alternate the group sizes, so that a burst of load from other processes does not hit one k only.
    runs: dict[int, list[dict]] = {k: [] for k in args.group_sizes}
    for _ in range(args.rounds):
        for k in args.group_sizes:
            command = [sys.executable, __file__, "--group-size", str(k)] + [
                f"--{name}={getattr(args, name.replace('-', '_'))}"
                for name in ("repeats", "warmup", "threads", "conversations", "user-seconds", "assistant-seconds",
                             "llm-hidden", "llm-layers", "device")
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"bench_grouping: worker for k={k} failed:\n{done.stderr}")
            runs[k].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = []
    for k, worker_runs in runs.items():
        merged = dict(worker_runs[0])  # sizes, memory and FLOPs are the same in every round
        merged["step_seconds"] = [t for run in worker_runs for t in run["step_seconds"]]
        merged["step_seconds_median"] = statistics.median(merged["step_seconds"])
        merged["step_seconds_min"] = min(merged["step_seconds"])
        merged["peak_rss_increase_mb"] = min(run["peak_rss_increase_mb"] for run in worker_runs)
        results.append(merged)

    print(f"{'k':>3} {'LLM len':>8} {'SRH len':>8} {'step ms (median)':>17} {'min':>8} "
          f"{'peak RSS +MB':>13} {'saved act MB':>13} {'GFLOP/step':>11} {'fwd GFLOP mel enc':>18} "
          f"{'fwd GFLOP backbone':>19}")
    for r in results:
        print(f"{r['group_size']:>3} {r['llm_sequence_length']:>8} {r['srh_sequence_length']:>8} "
              f"{1000 * r['step_seconds_median']:>17.1f} {1000 * r['step_seconds_min']:>8.1f} "
              f"{r['peak_rss_increase_mb']:>13.1f} {r['saved_activations_mb']:>13.1f} {r['train_step_gflops']:>11.2f} "
              f"{r['forward_gflops_by_component']['continuous_audio_tower']:>18.2f} "
              f"{r['backbone_forward_gflops']:>19.2f}")
    ratios = {}
    if len(results) >= 2:
        a, b = results[0], results[1]
        ratios = {
            "step_time_median": a["step_seconds_median"] / b["step_seconds_median"],
            # the minimum is the estimate least disturbed by other processes on a shared machine
            "step_time_min": a["step_seconds_min"] / b["step_seconds_min"],
            "peak_rss_increase": a["peak_rss_increase_mb"] / b["peak_rss_increase_mb"],
            "saved_activations": a["saved_activations_mb"] / b["saved_activations_mb"],
            "train_step_flops": a["train_step_gflops"] / b["train_step_gflops"],
            "backbone_forward_flops": a["backbone_forward_gflops"] / b["backbone_forward_gflops"],
        }
        listing = ", ".join(f"{name} {value:.3f}" for name, value in ratios.items())
        print(f"\nratios k{a['group_size']}/k{b['group_size']}: {listing}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "training step, grouping k (tiny config from build_config)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("group_size", "out")},
        "memory_method": "peak_rss_increase_mb: resource.getrusage ru_maxrss (fresh subprocess per k) minus VmRSS "
                         "just before the first step; saved_activations_mb: autograd saved-tensor hooks",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "results": results,
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
