"""What parsing the workflow costs: wall time and peak memory of `snakemake -n` on the default experiment.

Run from the repository root after `make setup`:  .venv/bin/python bench/bench_dry_run.py [--runs 5]
Each run is a fresh `snakemake --profile workflow/profiles/local -n` process; the figures are its wall time
and its own peak resident memory (from wait4, children such as espeak-ng not included), median over the runs.
Target (issue 18): at most 2 s and 300 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS, TARGET_MB = 2.0, 300.0


def one_run(snakemake: Path) -> tuple[float, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    start = time.perf_counter()
    proc = subprocess.Popen([str(snakemake), "--profile", "workflow/profiles/local", "-n", "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        sys.exit(f"snakemake -n failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench/results/dry_run.json"))
    args = parser.parse_args()
    snakemake = Path(sys.executable).parent / "snakemake"
    one_run(snakemake)  # warm the file cache and Snakemake's source cache; not counted
    runs = [one_run(snakemake) for _ in range(args.runs)]
    seconds = statistics.median(s for s, _ in runs)
    megabytes = statistics.median(m for _, m in runs)
    print(f"snakemake -n, default experiment, median of {args.runs} runs: {seconds:.2f} s "
          f"(target <= {TARGET_SECONDS:g} s), peak RSS {megabytes:.0f} MB (target <= {TARGET_MB:g} MB)")
    print(f"  per run: " + ", ".join(f"{s:.2f} s / {m:.0f} MB" for s, m in runs))
    print(f"  ratios to target: time {seconds / TARGET_SECONDS:.2f}, memory {megabytes / TARGET_MB:.2f}")
    Path(args.out).write_text(json.dumps({
        "runs": [{"seconds": round(s, 3), "peak_rss_mb": round(m, 1)} for s, m in runs],
        "median_seconds": round(seconds, 3), "median_peak_rss_mb": round(megabytes, 1),
        "target_seconds": TARGET_SECONDS, "target_mb": TARGET_MB, "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
