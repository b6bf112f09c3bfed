"""Fixtures for end-to-end tests: a real one-node SLURM cluster (see slurm_cluster.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.slurm_cluster import SlurmCluster, SlurmClusterError, missing_binaries


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A started SlurmCluster shared by the session, or a skip that says why there is none."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}); run .ci/install_slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs its daemons as SlurmUser=root: needs root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmClusterError as e:
        pytest.skip(f"could not start a one-node SLURM cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
