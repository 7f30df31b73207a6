"""Shared fixtures. Ray is started once per test session: a start costs seconds, and a stale head breaks
later ``ray.init()`` calls."""

import pytest


def pytest_collection_modifyitems(items):
    """Every test that uses the session's Ray carries the ``ray`` marker (``-m "not ray"``: the fast part)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_local():
    ray = pytest.importorskip("ray")
    # More logical CPUs than the 2 cores of a small machine: a Ray Data read stage and two actors (or
    # train workers) must not starve each other.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store, artifacts in a temp dir), stopped at the end."""
    pytest.importorskip("mlflow")
    from _services import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 4-image synthetic dataset of 64×64 images (2 val): for tests where the data's size proves nothing."""
    from dearli.data.synth.writer import write_synth_dataset

    return write_synth_dataset(tmp_path_factory.mktemp("data") / "synth", num_images=4, seed=1, num_val=2,
                               image_size=(64, 64))
