"""Shared test set-up: no network, one thread, the repository root and the world lexicon."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def lexicon_path() -> Path:
    return ROOT / "data" / "world" / "lexicon.yaml"
