"""The SLURM test's cluster and its run (tests/test_slurm.py).

The one-node cluster comes from workflow/cluster/local-slurm.sh (Debian's packages, installed when missing). The
run (the micro world's data target, the base LLM and its evaluation, through the SLURM profile) mostly waits on the
scheduler, so the micro_run fixture (conftest.py) starts it in the background when the session holds a test that
needs it, and the rest of the suite runs meanwhile; `RUN.result()` waits for it (and starts it if nothing did). The
tests that need it are in micro_run's pytest-xdist group: one worker, one run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from workflow_helpers import BIN, ROOT, env, snakemake_args

SCRIPT = ROOT / "workflow" / "cluster" / "local-slurm.sh"
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
PARTITION = "fac"  # the partition and account local-slurm.sh creates (a user edits the profile's instead)
# What the test changes of the profile on the command line: where jobs go, and a status check every second.
OVERRIDES = ["--default-resources", f"slurm_partition={PARTITION}", f"slurm_account={PARTITION}",
             "--slurm-init-seconds-before-status-checks", "1"]
TARGETS = ("data", "results/micro/eval/base_llm.json")
SET_RESOURCES = ["--set-resources", "evaluate:runtime=7"]  # a per-rule override, as a profile's set-resources


class Unavailable(Exception):
    """No cluster can be had here (not root, so the packages cannot be installed): the tests skip with this."""


def slurm_env() -> dict:
    return dict(env(), SLURM_CONF="/etc/slurm/slurm.conf")


def cluster_answers() -> bool:
    return shutil.which("scontrol") is not None and subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True, env=slurm_env()).returncode == 0


def slurm_snakemake(workdir: Path, *targets: str, overlays=("tests/configs/micro.yaml",), extra=()):
    cmd = [str(BIN / "snakemake"), "--profile", str(PROFILE), *OVERRIDES, *extra, "--verbose",
           *snakemake_args(workdir, *targets, overlays=overlays, profile=None)]
    return subprocess.run(cmd, capture_output=True, text=True, env=slurm_env(), cwd=workdir, timeout=1800)


class Run:
    """The cluster, brought up unless one answers, and the SLURM run of TARGETS, in a thread."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.started_cluster = False
        self.workdir: Path | None = None
        self.proc: subprocess.CompletedProcess | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="slurm-run", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            if not cluster_answers():
                if os.geteuid() != 0:
                    raise Unavailable("starting the test cluster needs root (it installs Debian's SLURM packages)")
                up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=1200)
                if up.returncode != 0:
                    raise RuntimeError(f"local-slurm.sh up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
                self.started_cluster = True
            self.workdir = Path(tempfile.mkdtemp(prefix="fac-slurm-run-"))
            self.proc = slurm_snakemake(self.workdir, *TARGETS, extra=SET_RESOURCES)
        except BaseException as err:  # handed to the test that waits for it
            self.error = err

    def result(self) -> tuple[Path, subprocess.CompletedProcess]:
        self.start()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.workdir, self.proc

    def stop(self) -> None:
        """At the session's end: the cluster down again if this run started it (its packages stay)."""
        if self.thread is not None:
            self.thread.join()
        if self.started_cluster:
            subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


RUN = Run()
