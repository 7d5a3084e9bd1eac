"""Shared test set-up: no network, one thread, the repository root and the world lexicon."""
import json
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
def micro_run(tmp_path_factory, request):
    """One real run of the whole DAG on the micro world (data, then a few steps of every stage), built once and
    shared by every test that reads a built experiment (the workflow's, the README's and the SLURM test's: one
    group, MICRO_RUN_MODULES, that pytest-xdist runs on one worker, so that this is built once)."""
    from workflow_helpers import digests, snakemake

    if any("slurm_run" in item.fixturenames for item in request.session.items):
        from slurm_cluster import RUN

        RUN.start()  # the SLURM run mostly waits on the scheduler: it goes on in the background meanwhile
    workdir = tmp_path_factory.mktemp("micro")
    snakemake(workdir, "data", wandb="offline")
    snakemake(workdir, wandb="offline")  # as the README's run: every training stage logs an offline wandb run
    # The outputs as built, before any test reruns part of the DAG: what other runs of it are compared with.
    (workdir / BUILT_DIGESTS).write_text(json.dumps(digests(workdir / "results/micro"), indent=1, sort_keys=True))
    return workdir


BUILT_DIGESTS = "micro_digests.json"  # in the micro_run folder: workflow_helpers.digests of results/micro as built


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadscope`, grouped by `worker_group`). A
# group runs on one worker: a module's tests (its module fixtures are built once), and the modules whose tests read
# the micro experiment (micro_run) or the SLURM run (slurm_run: started by micro_run, compared with it), so that
# both are built once. The heaviest groups go first, so that the other worker fills the time of the longest.
# (xdist's own `xdist_group` markers are not used: xdist 3.8 writes the group into a node attribute that pytest 9
# no longer reads.)
MICRO_RUN_MODULES = ("tests/test_demo.py", "tests/test_kill_matrix.py", "tests/test_readme.py",
                     "tests/test_report_browser.py", "tests/test_slurm.py", "tests/test_workflow.py")
HEAVIEST_FIRST = ("micro_run", "tests/test_paper_rehearsal.py")


def worker_group(nodeid: str) -> str:
    module = nodeid.split("::")[0]
    return "micro_run" if module in MICRO_RUN_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if {"micro_run", "slurm_run"} & set(item.fixturenames) and worker_group(item.nodeid) != "micro_run":
            raise pytest.UsageError(f"{item.nodeid} reads the micro experiment: add its module to "
                                    "MICRO_RUN_MODULES in tests/conftest.py (one worker builds it)")
    rank = {group: i for i, group in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(worker_group(item.nodeid), len(rank)))  # stable: each group keeps its order


def pytest_sessionfinish(session):
    import sys

    if "slurm_cluster" in sys.modules:
        sys.modules["slurm_cluster"].RUN.stop()
