"""Import rules ruff cannot say per module: MLflow lives in the tracking and registry modules alone, Ray in the
orchestration modules alone (ruff's TID251 keeps both out of the math; this keeps MLflow out of the rest of
the orchestration too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dearli"
MLFLOW_HOMES = {"stages/tracking.py", "stages/registry.py"}
RAY_HOMES = ("runtime.py", "stages/", "bench/", "caches/job.py", "predict/job.py", "predict/serve.py",
             "predict/commands/serve.py", "predict/serve_training.py")


def _imports(path: Path) -> set[str]:
    """Top-level package names imported anywhere in the file (module level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules() -> dict[str, set[str]]:
    return {path.relative_to(PACKAGE).as_posix(): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_mlflow_is_imported_by_the_tracking_and_registry_modules_only():
    users = {name for name, imports in _modules().items() if "mlflow" in imports}
    assert users == MLFLOW_HOMES


def test_ray_is_imported_by_orchestration_modules_only():
    users = {name for name, imports in _modules().items() if "ray" in imports}
    assert users and all(name.startswith(RAY_HOMES) for name in users), sorted(users)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    import mlflow.tracking\n    from ray import train\n")
    assert _imports(module) == {"os", "mlflow", "ray"}
