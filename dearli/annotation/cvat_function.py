"""A dearli checkpoint as a CVAT auto-annotation function (``cvat_sdk.auto_annotation``'s detection
function): one mask per panoptic segment, labelled with its class's display name.

With ``cvat-cli`` (``pip install cvat-cli``), locally or as a native function served by an agent::

    cvat-cli --server-host URL --auth USER task auto-annotate TASK_ID \\
        --function-module dearli.annotation.cvat_function -p checkpoint=str:models:/dearli/3
    cvat-cli --server-host URL --auth USER function create-native "dearli" \\
        --function-module dearli.annotation.cvat_function -p checkpoint=str:models:/dearli/3
    cvat-cli --server-host URL --auth USER function run-agent FUNCTION_ID \\
        --function-module dearli.annotation.cvat_function -p checkpoint=str:models:/dearli/3

Parameters (``-p NAME=TYPE:VALUE``): ``checkpoint`` (str, required: a checkpoint file or a registered model),
``classes`` (str: a classes.json to label with; default: the checkpoint's dataset's), ``device`` (str: auto,
cpu, cuda[:N]), ``max_pixels`` (int: larger frames are refused), ``allow_diagnostic`` (bool: load a
diagnostic model anyway, see ``dearli serve --allow-diagnostic``).

The spec has one label per class, of type ``mask``, named by the class's display name (its first synonym): the
task's labels match by name, and ``--allow-unmatched-labels`` drops the classes the task lacks. A segment is a
mask shape in CVAT's mask RLE (``cvat_sdk.masks.encode_mask``: run lengths over its bounding box, then left,
top, right, bottom); segments never overlap. When CVAT asks for polygons (``conv_mask_to_poly``) each part of a
segment is a polygon instead (holes filled; pixel-edge coordinates, see :mod:`dearli.data.polygon`).
``conf_threshold`` drops segments whose class score is lower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from cvat_sdk import auto_annotation as cvataa
from cvat_sdk import models
from cvat_sdk.masks import encode_mask

from dearli.annotation.label_studio import class_names
from dearli.data.polygon import mask_polygons
from dearli.errors import DataError
from dearli.predict.labeler import SERVE_MAX_PIXELS, Labeler


class DearliFunction:
    """The detection function of a loaded checkpoint (see the module docstring); :func:`create` makes one."""

    def __init__(self, labeler: Labeler):
        self.labeler = labeler
        names = class_names(labeler.default, "the class list")
        self.spec = cvataa.DetectionFunctionSpec(labels=[
            cvataa.label_spec(name, category.id, type="mask")
            for name, category in zip(names, labeler.default.categories)])

    def detect(self, context: cvataa.DetectionFunctionContext,
               image: PIL.Image.Image) -> Sequence[models.LabeledShapeRequest]:
        width, height = image.size
        if width * height > self.labeler.max_pixels:
            raise DataError(context.frame_name, f"{width}×{height} pixels exceed max_pixels="
                                                f"{self.labeler.max_pixels}")
        threshold = context.conf_threshold if context.conf_threshold is not None else 0.0
        panoptic, records = self.labeler.label_array(np.array(image.convert("RGB")), threshold)
        return shapes(panoptic, records, context.conv_mask_to_poly)


def shapes(panoptic: np.ndarray, records: list[dict[str, Any]],
           polygons: bool = False) -> list[models.LabeledShapeRequest]:
    """CVAT shapes of a panoptic prediction: a mask per segment (its ``category_id`` as the label id), or
    with ``polygons`` a polygon per part of a segment."""
    found = []
    for record in records:
        mask = panoptic == record["id"]
        if not mask.any():
            continue
        if polygons:
            found += [cvataa.polygon(record["category_id"], points.ravel().tolist())
                      for points in mask_polygons(mask)]
        else:
            found.append(cvataa.mask(record["category_id"], encode_mask(mask)))
    return found


def create(checkpoint: str, classes: str = "", device: str = "auto", max_pixels: int = SERVE_MAX_PIXELS,
           allow_diagnostic: bool = False) -> DearliFunction:
    """The function of ``checkpoint`` (``cvat-cli -p checkpoint=str:PATH``; see the module docstring)."""
    from dearli.device import resolve_device
    from dearli.predict.model_source import resolve_classes
    from dearli.predict.serve import serving_payload

    payload = serving_payload(checkpoint, allow_diagnostic)
    categories = resolve_classes(classes or None, payload["config"])
    return DearliFunction(Labeler(payload, categories, str(resolve_device(device)), max_pixels))
