"""Run Snakemake on the project's workflow from a scratch folder, as a user would from the repo root."""
import hashlib
import json
import os
import re
import signal
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


# What differs between two runs of the same DAG without being an output: wall-clock figures in JSON files.
TIMINGS = {"wall_seconds", "step_seconds_mean", "tokens_per_second", "train_step_seconds", "train_tokens_per_second"}


def comparable(path: Path):
    """A file's content as a comparison of two runs sees it: JSON without its wall-clock timings, else bytes."""
    if path.suffix == ".json":
        def strip(value):
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
            if isinstance(value, list):
                return [strip(v) for v in value]
            return value
        return strip(json.loads(path.read_text()))
    if path.suffix == ".md" and path.read_text().startswith("| "):  # a table (metrics.md): its timing columns blank
        rows = [line.split(" | ") for line in path.read_text().splitlines()]
        drop = {i for i, name in enumerate(rows[0]) if name.strip("| ") in TIMINGS}
        return "\n".join(" | ".join("" if i in drop else cell for i, cell in enumerate(row)) for row in rows).encode()
    return path.read_bytes()


def outputs(results: Path) -> list[Path]:
    """An experiment's outputs (results/<exp>), relative: every file but logs, benchmarks, resume state and wandb
    runs (also the data folder's own logs/ and benchmarks/)."""
    skip = ("logs", "benchmarks", "state", "wandb")
    return sorted(p.relative_to(results) for p in results.rglob("*") if p.is_file()
                  and not set(p.relative_to(results).parts[:2]) & set(skip))


def digests(results: Path, renamed: tuple[str, str] | None = None) -> dict[str, str]:
    """outputs(results) -> sha256 of each one's comparable content: the hash manifest two runs are compared by.
    `renamed` (old, new): the text `old` reads as `new` (another experiment's paths, results/<exp>/, as this one's)."""
    def digest(path: Path) -> str:
        content = comparable(path)
        raw = content if isinstance(content, bytes) else json.dumps(content, sort_keys=True).encode()
        if renamed:
            raw = raw.replace(renamed[0].encode(), renamed[1].encode())
        return hashlib.sha256(raw).hexdigest()
    return {str(p): digest(results / p) for p in outputs(results)}


def rerun_through_faults(workdir: Path, *targets: str, points, fired: Path,
                         overlays=("tests/configs/micro.yaml",)) -> list[int]:
    """The kill matrix's loop: `snakemake targets` with the fac.faults `points` armed (markers in `fired`), run again
    until it ends (`--unlock` first after a run whose whole process group was killed), at most once per point more
    than there are points. Asserts that it ended and that every point fired; returns every run's return code."""
    from fac.faults import marker_name, planned

    spec = ",".join(points)
    faulty = dict(env(), FAC_FAULTS=spec, FAC_FAULTS_FIRED=str(fired))

    def run(*args: str) -> subprocess.CompletedProcess:
        # Its own session: a `group:` point kills this snakemake's process group, never pytest's.
        return subprocess.run([str(BIN / "snakemake"), *targets, *args, *snakemake_args(workdir, overlays=overlays)],
                              capture_output=True, text=True, env=faulty, cwd=workdir, start_new_session=True)

    codes = []
    while len(codes) <= len(points):
        proc = run()
        codes.append(proc.returncode)
        if proc.returncode == 0:
            break
        if proc.returncode == -signal.SIGKILL:  # the whole group: its lock is left behind, as after a crash
            assert run("--unlock").returncode == 0
    assert codes[-1] == 0, f"still failing after {len(codes)} runs {codes}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert sorted(os.listdir(fired)) == sorted(marker_name(*item) for item in planned(spec)), "a point never fired"
    return codes
