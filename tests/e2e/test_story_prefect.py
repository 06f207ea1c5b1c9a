"""The same story through the Prefect flow `retrain`, against a real (ephemeral) Prefect server."""

import pytest

from ratchet.cli import Engine
from tests.e2e.story import assert_story, play


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.mark.e2e
def test_story_through_prefect(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    ws, rows = play(tmp_path, Engine.prefect)
    assert_story(ws, rows)
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.name]
        assert len(runs) == 3 and all(r.state.is_completed() for r in runs)
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gate-decision"]))
        )
    assert len(arts) == 3
    assert any("Gate decision: **rejected**" in a.data for a in arts)
    assert all(f"models:/{rows[0]['gate']['model_name']}/" in a.data for a in arts)
