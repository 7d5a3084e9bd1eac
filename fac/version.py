"""Versioned experiments: an experiment's outputs (results/<exp>/, resume points and wandb runs excepted)
are one DVC-tracked folder, `results/<exp>.dvc` in git (with the folder of the experiment whose data it uses,
when its `data` is a link to another's); its metrics.json is a DVC metric and the params
files DVC params, so `dvc metrics diff`, `dvc params diff` and `dvc exp show` compare experiments across
git revisions.

    fac version save --experiment default --remote NAME     # dvc add + dvc push; then git commit
    fac version restore --experiment default [--remote NAME] [-- SNAKEMAKE ARGS]

`restore` pulls the folder, then lets Snakemake touch every output in DAG order (`--touch`): DVC writes
files in no particular order, and Snakemake would otherwise rerun jobs whose outputs look older than
their inputs. Afterwards `snakemake -n` has nothing to do.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

IGNORED = ["/results/*/state/", "/results/*/wandb/"]  # resume points and wandb runs are not versioned
PARAMS_FILES = ["params/default.yaml"]


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def declare(repo: Path, experiment: str) -> None:
    """dvc.yaml lists the experiment's metrics.json and the params files; .dvcignore skips undeclared state."""
    path = repo / "dvc.yaml"
    spec = yaml.safe_load(path.read_text()) if path.is_file() else {}
    spec = spec or {}
    metrics = spec.setdefault("metrics", [])
    metric = f"results/{experiment}/metrics.json"
    if metric not in metrics:
        metrics.append(metric)
    params = spec.setdefault("params", [])
    for name in PARAMS_FILES:
        if (repo / name).is_file() and name not in params:
            params.append(name)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    ignore = repo / ".dvcignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    missing = [p for p in IGNORED if p not in lines]
    if missing:
        ignore.write_text("\n".join(lines + missing) + "\n")


def check_remote(repo: Path, remote: str | None) -> None:
    """Experiments go to a remote outside the repository: the in-repo `local` remote (which ships data/
    with git) would put hundreds of megabytes of checkpoints and audio into git."""
    from dvc.repo import Repo

    config = Repo(str(repo)).config
    urls = {name: spec["url"] for name, spec in config.get("remote", {}).items()}
    name = remote or config.get("core", {}).get("remote", "")
    if name not in urls:
        raise ValueError(f"{repo}: no DVC remote {name!r} (known: {sorted(urls)}); add one outside the repository: "
                         "dvc remote add store /path/or/s3://bucket, then --remote store")
    url = str(urls[name])
    if "://" not in url:
        path = Path(url) if Path(url).is_absolute() else (repo / ".dvc" / url)
        if path.resolve().is_relative_to(repo.resolve()):
            raise ValueError(f"DVC remote {name!r} ({url}) lies inside the repository and is committed to git; "
                             "save experiments to a remote outside it: dvc remote add store /path, then --remote store")


def lender(repo: Path, experiment: str) -> str | None:
    """The experiment whose data folder this one uses (`results/<exp>/data.from`, written by the workflow when it
    links `results/<exp>/data` to another experiment's data), or None when its data are its own."""
    from fac.params import LENDER_RECORD

    record = repo / "results" / experiment / LENDER_RECORD
    return record.read_text().strip() if record.is_file() else None


def save(repo: str | Path, experiment: str, remote: str | None = None) -> str:
    """Save the experiment's folder; one whose data are another experiment's (a link, which DVC does not follow)
    saves that experiment's folder too, so that a restore has the data."""
    repo = Path(repo)
    check_remote(repo, remote)
    folder = repo / "results" / experiment
    if not (folder / "metrics.json").is_file():
        raise FileNotFoundError(f"{folder}/metrics.json: the experiment has no metrics yet (run the workflow first)")
    experiments = [experiment]
    other = lender(repo, experiment)
    if other:
        if not (repo / "results" / other / "data").is_dir():
            raise FileNotFoundError(f"{folder}/data.from: the experiment's data are experiment {other!r}'s, but "
                                    f"{repo / 'results' / other / 'data'} is missing")
        experiments.append(other)
    declare(repo, experiment)
    dvc = _tool("dvc")
    _run([dvc, "add", "-q", *[f"results/{name}" for name in experiments]], repo)
    pointers = [f"results/{name}.dvc" for name in experiments]
    # DVC writes results/.gitignore only when git does not already ignore the folder.
    staged = [p for p in (*pointers, "results/.gitignore", "dvc.yaml", ".dvcignore") if (repo / p).is_file()]
    _run(["git", "add", *staged], repo)
    _run([dvc, "push", "-q", *(["-r", remote] if remote else []), *pointers], repo)
    return " ".join(pointers)


def pull(repo: str | Path, experiment: str, remote: str | None = None) -> list[str]:
    """Pull the experiment's folder, and the folder of the experiment whose data it uses; returns the pointers."""
    repo = Path(repo)
    pointer = repo / "results" / f"{experiment}.dvc"
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer}: this revision has no saved experiment {experiment!r}")
    flags = ["-r", remote] if remote else []
    pulled = [str(pointer.relative_to(repo))]
    _run([_tool("dvc"), "pull", *flags, pulled[0]], repo)
    other = lender(repo, experiment)
    if other:
        data_pointer = repo / "results" / f"{other}.dvc"
        if not data_pointer.is_file():
            raise FileNotFoundError(f"{data_pointer}: experiment {experiment!r} uses experiment {other!r}'s data, "
                                    "which this revision did not save")
        pulled.append(str(data_pointer.relative_to(repo)))
        _run([_tool("dvc"), "pull", *flags, pulled[-1]], repo)
    return pulled


def restore(repo: str | Path, experiment: str, remote: str | None = None, snakemake_args: list[str] | None = None):
    repo = Path(repo)
    pull(repo, experiment, remote)
    args = snakemake_args or ["--profile", "workflow/profiles/local"]
    _run([_tool("snakemake"), "--touch", *args], repo)
