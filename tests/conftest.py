"""Fixtures shared by the unit (``tests/unit/<part>``) and end-to-end (``tests/e2e``) tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 24 generated 24-px images (an ImageFolder layout), one per test module."""
    return make_folder(tmp_path_factory.mktemp("imgs"))
