"""Fixtures shared by every test directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a local HF directory (imported once into $DTRAIN_CACHE)."""
    from dtrain import importer

    return Path(importer.resolve("smollm2-135m-instruct"))
