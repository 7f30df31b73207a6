"""The cluster files: cluster.yaml passes Ray's own validation, names the image docker/Dockerfile builds,
and the Dockerfile's Ray base image is the Ray that pyproject.toml pins (and that the tests run)."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from dearli.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CUSTOM_RESOURCES = {"dearli_train": "train.worker_resources", "dearli_teacher": "ssl.teacher_resources"}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "docker" / "Dockerfile").read_text()


def pinned_ray_version() -> str:
    """The version in pyproject's ``ray[...]==X.Y.Z`` dependency (an exact pin: see the comment there)."""
    text = (ROOT / "pyproject.toml").read_text()
    pins = re.findall(r'^\s*"ray(?:\[[\w,]+\])?==(\d+\.\d+\.\d+)",', text, flags=re.MULTILINE)
    assert len(pins) == 1, "pyproject.toml must pin ray exactly once, as \"ray[...]==X.Y.Z\""
    assert not re.search(r'^\s*"ray(\[[\w,]+\])?[<>~!]', text, flags=re.MULTILINE), "ray has a second requirement"
    return pins[0]


def test_cluster_yaml_passes_rays_own_validation(cluster):
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    # What `ray up` does before launching: fill in the provider defaults, then check against ray-schema.json
    # (unknown keys, wrong types, head_node_type among the node types, min_workers within max_workers).
    prepared = util.prepare_config(copy.deepcopy(cluster))
    util.validate_config(prepared)
    # the check has teeth: a misspelt key is refused
    broken = copy.deepcopy(prepared)
    broken["available_node_types"]["head"]["node_confg"] = broken["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception, match="node_confg|node_config"):
        util.validate_config(broken)


def test_cluster_yaml_has_a_head_gpu_workers_and_shared_storage(cluster):
    for key in ("cluster_name", "max_workers", "provider", "docker", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cluster, key
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in types
    gpu_types = [name for name, t in types.items() if name != head and t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU worker node type"
    # the custom resources the config sections ask for exist on a GPU node type, and the config accepts them
    for name, field in CUSTOM_RESOURCES.items():
        assert any(types[t]["resources"].get(name, 0) > 0 for t in gpu_types), name
        section, key = field.split(".")
        cfg = load_config("tiny", [f"{field}={{{name}: 1}}"])
        assert getattr(getattr(cfg, section), key) == {name: 1.0}
    # the shared filesystem is mounted into every container, and the token auth setting reaches every node
    options = " ".join(cluster["docker"]["run_options"])
    assert "-v /mnt/shared:/mnt/shared" in options
    assert "--env RAY_AUTH_MODE=token" in options
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert any("/mnt/shared" in c for c in cluster["initialization_commands"])


def test_cluster_image_is_the_one_the_dockerfile_builds(cluster, dockerfile):
    tags = re.findall(r"docker build -f docker/Dockerfile -t (\S+) \.", dockerfile)
    assert len(tags) == 1, "the Dockerfile states its build command once"
    assert cluster["docker"]["image"] == tags[0]
    assert "head_image" not in cluster["docker"] and "worker_image" not in cluster["docker"]
    # the README's build command makes the same image
    readme_tags = re.findall(r"docker build -f docker/Dockerfile -t (\S+) \.", (ROOT / "README.md").read_text())
    assert readme_tags and set(readme_tags) == {tags[0]}


def test_dockerfile_base_is_the_pinned_ray(dockerfile):
    import ray

    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert len(bases) == 1
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", bases[0])
    assert match, f"base image {bases[0]!r} is not rayproject/ray:<version>-py311-gpu"
    assert match.group(1) == pinned_ray_version()
    # the Ray these tests (and the jobs a developer submits) run is the one the cluster gets
    assert ray.__version__ == pinned_ray_version()
    # the image tag says which Ray it carries, so a Ray upgrade cannot keep an old image name
    tag = re.search(r"-t (\S+) \.", dockerfile).group(1)
    assert f"ray{match.group(1)}" in tag


def test_dockerfile_installs_the_package_from_a_small_context(dockerfile):
    assert re.search(r"^RUN pip install --no-cache-dir \. ", dockerfile, flags=re.MULTILINE)
    for copied in ("pyproject.toml", "dearli", "jobs"):
        assert re.search(rf"^COPY .*\b{copied}\b", dockerfile, flags=re.MULTILINE), copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
