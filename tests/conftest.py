"""Shared test fixtures: repository paths and the embedded demo's descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEMO_ROOT = REPO_ROOT / "data" / "demo"

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_features() -> Path:
    """The demo data root with descriptors extracted (the main job's first step; a no-op when up to date)."""
    subprocess.run([sys.executable, "-m", "csa.demo", "extract", "--root", str(DEMO_ROOT)], check=True, cwd=REPO_ROOT)
    return DEMO_ROOT
