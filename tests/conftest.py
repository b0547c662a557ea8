"""Shared test fixtures.

The real TACO sample is read in place from the folder named by ``RAYWASTE_TEST_DATA``
(default: ``../shared/data`` beside the repository). Tests never copy it into the tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("RAYWASTE_TEST_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def test_data() -> Path:
    if not TEST_DATA.is_dir():
        pytest.fail(f"test data folder not found: {TEST_DATA}; set RAYWASTE_TEST_DATA to the folder with taco-sample/")
    return TEST_DATA


@pytest.fixture(scope="session")
def taco_sample(test_data: Path) -> Path:
    return test_data / "taco-sample"


@pytest.fixture(scope="session")
def taco_official(test_data: Path) -> Path:
    return test_data / "taco-official" / "annotations.json"


@pytest.fixture(scope="session")
def taco_maps(test_data: Path) -> Path:
    return test_data / "taco-maps"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session; stages use it instead of starting their own.

    A test that needs another cluster layout runs it in a subprocess, since a process can
    hold only one Ray connection.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
