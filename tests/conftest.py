"""Shared fixtures. Ray is started once per test session: a start costs seconds, and a stale head breaks
later ``ray.init()`` calls."""

import pytest

# The slowest files (see the `--durations` list every run prints). pytest-xdist hands each of its two workers
# two files to start with: 1st and 3rd to one, 2nd and 4th to the other, which splits these about evenly.
SLOW_FIRST = ["test_jobs_ssl.py", "test_multinode.py", "test_caches.py", "test_stages.py",
              "test_predict_pseudo_label.py"]


def pytest_collection_modifyitems(items):
    """Every test that uses the session's Ray carries the ``ray`` marker (``-m "not ray and not paper"``: the
    fast part; a ``-m`` of the command line replaces the ``not paper`` of the configured options), every test
    that uses the Label Studio server the ``label_studio`` marker.

    Files with Ray tests (or the Label Studio server, up to a minute to start) run first, in the order of
    ``SLOW_FIRST`` and then by name; the rest keep their order. With ``pytest -n 2`` (the README's command)
    files go to the two workers in this order, so the minute-long Ray files start early and the many quick
    ones fill in around them."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if "label_studio" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.label_studio)
    ray_files = {item.path.name for item in items if any(item.get_closest_marker(name) for name in (
        "ray", "multinode", "label_studio"))}

    def rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in SLOW_FIRST:
            return (0, SLOW_FIRST.index(name))
        return (1, 0) if name in ray_files else (2, 0)

    items.sort(key=rank)  # stable: the order within a file is kept


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
def label_studio(tmp_path_factory):
    """A real Label Studio server on 127.0.0.1 (sqlite in a temp dir, offline), stopped at the end: its URL,
    user, password, a legacy token and a personal access token; it serves local files below its ``files_root``.
    Fails, naming the install command, where ``.venv-label-studio`` is missing."""
    from _label_studio import label_studio_server, missing

    if why := missing():
        pytest.fail(why, pytrace=False)
    files = tmp_path_factory.mktemp("label-studio-files")
    env = {"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files)}
    with label_studio_server(tmp_path_factory.mktemp("label-studio"), env=env) as server:
        yield server


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 4-image synthetic dataset of 64×64 images (2 val): for tests where the data's size proves nothing."""
    from dearli.data.synth.writer import write_synth_dataset

    return write_synth_dataset(tmp_path_factory.mktemp("data") / "synth", num_images=4, seed=1, num_val=2,
                               image_size=(64, 64))


@pytest.fixture(scope="module")
def synth(request, tmp_path_factory):
    """A synthetic dataset of 64×64 images for one module: ``write_synth_dataset`` with the ``num_images``,
    ``seed`` and ``num_val`` of the module's ``SYNTH`` dict; a module without one gets ``small_world``."""
    options = getattr(request.module, "SYNTH", None)
    if options is None:
        return request.getfixturevalue("small_world")
    from dearli.data.synth.writer import write_synth_dataset

    return write_synth_dataset(tmp_path_factory.mktemp("data") / "synth", image_size=(64, 64), **options)


@pytest.fixture(scope="module")
def checkpoint(request, synth, tmp_path_factory):
    """An untrained tiny M2F-Lang checkpoint of ``synth``'s classes: ``_tiny_model.tiny_checkpoint`` with the
    keyword arguments of the module's ``CHECKPOINT`` dict (config overrides, step, optimizer state)."""
    from _tiny_model import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("run"), synth, **getattr(request.module, "CHECKPOINT", {}))


@pytest.fixture(scope="module")
def backbone():
    """The tiny preset's frozen CLIP backbone (random ConvNeXt-atto, seeded), one per module."""
    import torch

    from dearli.config import load_config
    from dearli.model.backbone import build_backbone

    torch.manual_seed(0)
    return build_backbone(load_config("tiny").model.backbone)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny M2F-Lang (seeded) whose vocabulary is cat and grass, one per module."""
    import torch

    from dearli.config import load_config
    from dearli.model.m2f_lang import build_m2f_lang

    torch.manual_seed(0)
    return build_m2f_lang(load_config("tiny").model, [["cat"], ["grass"]])


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    small shared machine, threads waiting on each other cost more than they give."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
