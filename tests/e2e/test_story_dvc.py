"""The demo story through `dvc repro` (no Prefect), in a temporary workspace with the tiny model."""

import pytest

from ratchet.cli import Engine
from tests.e2e.story import assert_story, play


@pytest.mark.e2e
def test_story_through_dvc(tmp_path):
    ws, rows = play(tmp_path, Engine.dvc)
    assert_story(ws, rows)
