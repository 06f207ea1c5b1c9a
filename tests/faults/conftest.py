"""Every test under tests/faults is part of the fault suite (`make test-faults` runs `-m
faults`); the ones not marked `slow` are its quick subset, which `make test` runs too."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)
