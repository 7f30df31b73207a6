"""Label Studio's ML backend protocol, the model side (no Ray, no HTTP): what ``dearli serve`` answers on
``/health``, ``/setup``, ``/predict`` and ``/webhook`` (:mod:`dearli.predict.serve` routes them).

The requests Label Studio 1.23 sends (and the label-studio-ml-backend package answers)::

    POST /setup    {"project": "<id>.<created-at>", "schema": LABEL_CONFIG, "hostname", "access_token",
                    "extra_params"}                              -> {"model_version": V}
    POST /predict  {"tasks": [TASK, ...], "project": ..., "label_config": LABEL_CONFIG, "params": {...}}
                                                                 -> {"results": [PREDICTION, ...]}
    POST /webhook  {"action": "START_TRAINING" | "ANNOTATION_CREATED" | ..., "project": {"id", ...}, ...}
    GET  /health                                                 -> {"status": "UP", "model_class": ...}

A PREDICTION is ``{"result": [REGION, ...], "score", "model_version"}``, one per task and in the tasks' order;
REGIONs are brush masks (Label Studio's RLE) of the labeling config's ``BrushLabels`` tag, or polygons of its
``PolygonLabels`` tag, named by the tag's ``name`` (``from_name``) and its image's (``to_name``). A segment
whose class the config has no label for is left out and counted under ``left_out``; a task that cannot be
labeled (its image unreadable or not allowed) gets an empty ``result`` and an ``error``. ``/setup``'s
``hostname`` and ``access_token`` are ignored: images are read only from where the endpoint's own options allow
(:mod:`dearli.predict.task_images`).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from dearli.data.label_studio_format import FROM_NAME, TO_NAME, class_lookup, segment_regions
from dearli.data.panoptic import CategoryMap
from dearli.predict.labeler import RequestError, load_json

MODEL_CLASS = "dearli"  # what /health names as the model class
MAX_TASKS = 16  # tasks of one /predict request by default: Label Studio waits 100 s for the answer
MAX_CONFIG_CHARS = 1_000_000
LABEL_TAGS = ("brushlabels", "polygonlabels")  # preferred in this order: a brush holds the exact mask
TRAIN_EVENT = "START_TRAINING"
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED")
TEMPLATE_FIELDS = ("project", "model_version", "label_studio_url")  # what a --train-command may name


@dataclass(frozen=True)
class Target:
    """Where predictions go in a labeling config: the labels tag, its image tag, the task data key of the
    image, polygons or brush, and the tag's label values in order."""

    from_name: str
    to_name: str
    image_key: str
    polygons: bool
    labels: tuple[str, ...]


def load_object(body: bytes, what: str) -> dict[str, Any]:
    """A request body as a JSON object; RequestError 400 otherwise."""
    value = load_json(body)
    if not isinstance(value, dict):
        raise RequestError(400, f"{what}: the body must be a JSON object")
    return value


def _tag(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1].lower() if isinstance(element.tag, str) else ""


def parse_label_config(config: Any) -> Target:
    """The :class:`Target` of a Label Studio labeling config: its first BrushLabels tag (else PolygonLabels)
    whose ``toName`` is an Image tag with a ``$key`` value; RequestError 400 when there is none or the XML is
    not readable. Document type declarations are refused before parsing (no entities to expand)."""
    if not isinstance(config, str) or not config.strip():
        raise RequestError(400, "the labeling config is missing or not a string")
    if len(config) > MAX_CONFIG_CHARS:
        raise RequestError(413, f"the labeling config has more than {MAX_CONFIG_CHARS} characters")
    if re.search(r"<!(DOCTYPE|ENTITY)", config, re.IGNORECASE):
        raise RequestError(400, "the labeling config declares a document type or entities; they are not read")
    try:
        root = ET.fromstring(config)
    except ET.ParseError as err:
        raise RequestError(400, f"the labeling config is not valid XML: {err}") from None
    images = {el.get("name"): el.get("value", "") for el in root.iter() if _tag(el) == "image" and el.get("name")}
    for kind in LABEL_TAGS:
        for element in root.iter():
            if _tag(element) != kind:
                continue
            for to_name in (element.get("toName") or "").split(","):
                value = images.get(to_name.strip(), "")
                if value.startswith("$") and len(value) > 1 and element.get("name"):
                    labels = tuple(label.get("value") for label in element.iter()
                                   if _tag(label) == "label" and label.get("value"))
                    return Target(element.get("name"), to_name.strip(), value[1:], kind == "polygonlabels",
                                  labels)
    raise RequestError(400, "the labeling config has no BrushLabels or PolygonLabels tag on an Image tag with "
                            "value=\"$key\": dearli answers masks")


def default_target(categories: CategoryMap) -> Target:
    """The target of the config ``dearli export label-studio`` writes for ``categories``."""
    return Target(FROM_NAME, TO_NAME, TO_NAME, False, tuple(categories.names))


def label_names(target: Target, categories: CategoryMap) -> dict[int, str]:
    """category id -> the config's label for it (its display name, case-insensitively, or an unambiguous
    synonym; the first label naming a class wins). Classes without a label are absent."""
    lookup, names = class_lookup(categories), {}
    for label in target.labels:
        category = lookup(label)
        if category is not None and category.id not in names:
            names[category.id] = label
    return names


def parse_predict(body: bytes, max_tasks: int) -> tuple[list[Any], Any]:
    """(tasks, label_config or None) of a /predict body; RequestError 400, or 413 past ``max_tasks`` tasks."""
    request = load_object(body, "/predict")
    tasks = request.get("tasks")
    if not isinstance(tasks, list):
        raise RequestError(400, "/predict needs 'tasks': a list of Label Studio tasks")
    if len(tasks) > max_tasks:
        raise RequestError(413, f"{len(tasks)} tasks in one request, at most {max_tasks}: ask for fewer, or push "
                                "predictions in bulk with 'dearli export label-studio --url'")
    return tasks, request.get("label_config")


def task_image(task: Any, target: Target) -> Any:
    """The image reference of a task (``task["data"][image key]``); RequestError 400 when absent."""
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict) or target.image_key not in data:
        raise RequestError(400, f"the task has no data.{target.image_key[:40]} (the labeling config's image)")
    return data[target.image_key]


def prediction(panoptic: Any, records: list[dict[str, Any]], target: Target, names: dict[int, str],
               version: str) -> dict[str, Any]:
    """One task's prediction of a labeled image: regions of the segments whose class has a label, and the
    count of segments left out per class name."""
    kept, left_out = [], {}
    for record in records:
        label = names.get(record["category_id"])
        if label is None:
            left_out[record["category_name"]] = left_out.get(record["category_name"], 0) + 1
        else:
            kept.append({**record, "category_name": label})
    regions = segment_regions(panoptic, kept, target.polygons, target.from_name, target.to_name)
    return {**regions, "model_version": version, "left_out": left_out}


def failed(reason: str, version: str) -> dict[str, Any]:
    """The prediction of a task that could not be labeled: nothing, and why."""
    return {"result": [], "score": 0.0, "model_version": version, "error": reason}


def webhook_project(event: dict[str, Any]) -> int:
    """The project id of a webhook event (an integer, the only value a training command line receives)."""
    project = event.get("project")
    project_id = project.get("id") if isinstance(project, dict) else None
    if isinstance(project_id, bool) or not isinstance(project_id, int) or project_id < 0:
        raise RequestError(400, "the event needs 'project': {\"id\": a non-negative integer, ...}")
    return project_id


def check_template(template: str) -> None:
    """ValueError naming the problem when a --train-command template does not format with TEMPLATE_FIELDS."""
    try:
        template.format(**dict.fromkeys(TEMPLATE_FIELDS, "x"))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{template!r} does not format ({type(err).__name__}: {err}); it may name "
                         f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}") from None
