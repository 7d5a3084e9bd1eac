"""Shared test set-up: no network, one thread, the repository root and the world lexicon."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
# The official model's tiny conformance instance, its inputs and outputs (see its README).
CONFORMANCE_DIR = Path(__file__).parent / "data" / "conformance"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only adds contention on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cuda_devices(monkeypatch):
    """cuda_devices(n): this process sees n CUDA devices (0: no CUDA), whatever the machine has."""
    import torch

    def visible(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return visible


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def lexicon_path() -> Path:
    return ROOT / "data" / "world" / "lexicon.yaml"


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One real run of the whole DAG on the micro world (data, then a few steps of every stage), built once and
    shared by every test that reads a built experiment (the workflow's and the README's)."""
    from workflow_helpers import snakemake

    workdir = tmp_path_factory.mktemp("micro")
    snakemake(workdir, "data")
    snakemake(workdir)
    return workdir


def pytest_collection_finish(session):
    """The SLURM test's run mostly waits on the scheduler: when a selected test needs it, it starts now, in the
    background, and the rest of the suite runs meanwhile (tests/slurm_cluster.py)."""
    if any("slurm_run" in getattr(item, "fixturenames", ()) for item in session.items):
        from slurm_cluster import RUN

        RUN.start()


def pytest_sessionfinish(session):
    import sys

    if "slurm_cluster" in sys.modules:
        sys.modules["slurm_cluster"].RUN.stop()
