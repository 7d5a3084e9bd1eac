"""Run Snakemake on the project's workflow from a scratch folder, as a user would from the repo root."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCAL_PROFILE = ROOT / "workflow" / "profiles" / "local"


def env(wandb: str = "disabled") -> dict:
    """The environment of a run: no hub; wandb `disabled` (its start costs a training job about two seconds), or
    `offline` as the README's runs log (the micro_run fixture's run, whose logs a test reads)."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE=wandb)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def snakemake(workdir: Path, *args: str, overlays=("tests/configs/micro.yaml",), config: str | None = None,
              check: bool = True, base: str = "params/default.yaml",
              wandb: str = "disabled") -> subprocess.CompletedProcess:
    """snakemake with the `base` params plus overlays; the lexicon path is made absolute."""
    cmd = [str(BIN / "snakemake"), *snakemake_args(workdir, *args, overlays=overlays, config=config, base=base)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(wandb), cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def snakemake_args(workdir: Path, *args: str, overlays=("tests/configs/micro.yaml",), config: str | None = None,
                   base: str = "params/default.yaml", profile: Path | None = LOCAL_PROFILE):
    # Targets and flags first: --configfile and --config take every word after them. A base without a world
    # (params/paper.yaml) gets no lexicon. The local profile as the README runs it, on 2 cores; profile None: the
    # caller gives its own (the SLURM test).
    world = [f"world={{source: {ROOT / 'data/world/lexicon.yaml'}}}"] if base == "params/default.yaml" else []
    extra = world + ([config] if config else [])
    local = ["--profile", str(profile), "--cores", "2"] if profile else []
    return [*args, "-s", str(ROOT / "workflow/Snakefile"), "--directory", str(workdir),
            *local, "--configfile", str(ROOT / base),
            *[str(ROOT / o) for o in overlays], *(["--config", *extra] if extra else [])]


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs
