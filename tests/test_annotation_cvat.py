"""``dearli.annotation.cvat_function`` through CVAT's own pieces, without a CVAT server: loaded as ``cvat-cli``
loads a ``--function-module`` with ``-p`` parameters, its spec as ``cvat-cli function create-native`` sends it,
and its shapes checked and remapped by the annotation mapper that ``cvat-cli task auto-annotate`` and the agent
run on every frame; the masks decode with ``cvat_sdk.masks`` to the segments dearli's labeler answers."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from cvat_cli._internal.agent import get_function_driver_class
from cvat_cli._internal.common import FunctionLoader
from cvat_cli._internal.parsers import parse_function_parameter
from cvat_sdk import models
from cvat_sdk.auto_annotation import BadFunctionError, DetectionFunctionSpec
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
from cvat_sdk.masks import decode_mask

from dearli.config import load_config
from dearli.data.coco_format import rgb2id
from dearli.data.dataset import load_dataset
from dearli.data.polygon import polygon_mask
from dearli.errors import DataError
from dearli.model.m2f_lang import build_m2f_lang
from dearli.training.checkpoint import save_checkpoint

MODULE = "dearli.annotation.cvat_function"


@pytest.fixture(scope="module")
def function(small_world, tmp_path_factory):
    """The function of a random tiny checkpoint, loaded as ``cvat-cli ... --function-module MODULE
    -p checkpoint=str:PATH`` loads it; (function, checkpoint path)."""
    cfg = load_config("tiny", [f"data.dataset={small_world}", "model.inference.test_short_side=64",
                               "model.ensemble.alpha_clip=0.4"])
    torch.manual_seed(0)
    model = build_m2f_lang(cfg.model, load_dataset(small_world).categories.synonyms)
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("run"), 1, model, cfg)
    parameter = parse_function_parameter(f"checkpoint=str:{checkpoint}")
    return FunctionLoader(MODULE, None, dict([parameter])).load(), checkpoint


def expected(function, image: bytes) -> tuple[np.ndarray, list[dict]]:
    """dearli's own answer for an image file (what ``POST /`` of ``dearli serve`` answers): ids and segments."""
    answer = function.labeler.label(image, "image/png")
    ids = rgb2id(np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(answer["png"]))).convert("RGB")))
    return ids, answer["segments_info"]


def context(**kwargs) -> _DetectionFunctionContextImpl:
    return _DetectionFunctionContextImpl(frame_name="frame.png", **kwargs)


def dataset_labels(names: list[str], kind: str) -> list[models.Label]:
    """Labels of a CVAT task, ids of their own (as a server would have them)."""
    return [models.Label(id=1000 + i, name=name, type=kind, sublabels=[], attributes=[])
            for i, name in enumerate(names)]


def test_the_spec_has_a_mask_label_per_class_as_create_native_sends_it(function, small_world):
    function, _ = function
    categories = load_dataset(small_world).categories
    assert isinstance(function.spec, DetectionFunctionSpec)  # validated by cvat_sdk when it was made
    assert [(label.name, label.id, label.type) for label in function.spec.labels] == [
        (c.name, c.id, "mask") for c in categories.categories]
    fields = get_function_driver_class(function.spec).get_remote_function_fields(function.spec)
    assert fields == {"labels_v2": [{"name": c.name, "attributes": [], "type": "mask"}
                                    for c in categories.categories]}
    with pytest.raises(TypeError):  # a parameter the function does not take is named at once
        FunctionLoader(MODULE, None, {"checkpoint": "x", "treshold": 0.5}).load()


def test_detect_returns_cvat_masks_of_dearlis_segments(function, small_world):
    function, _ = function
    record = load_dataset(small_world).split("val").records[0]
    ids, segments = expected(function, record.image_path.read_bytes())
    assert segments, "a random model that predicts nothing would prove nothing here"
    image = PIL.Image.open(record.image_path)
    shapes = function.detect(context(), image)
    assert len(shapes) == len(segments)
    for shape, segment in zip(shapes, segments):
        assert shape.type.value == "mask" and shape.label_id == segment["category_id"] and shape.frame == 0
        x, y, w, h = map(int, segment["bbox"])
        assert shape.points[-4:] == [x, y, x + w - 1, y + h - 1]  # CVAT's mask RLE ends with its box
        np.testing.assert_array_equal(decode_mask(shape.points, image_width=image.width, image_height=image.height),
                                      ids == segment["id"])

    # what cvat-cli does with a frame's shapes: checked against the task's labels by name, remapped
    names = [label.name for label in function.spec.labels]
    present = sorted({s["category_id"] for s in segments})
    mapper = _AnnotationMapper(logging.getLogger("cvat"), function.spec.labels, dataset_labels(names, "mask"),
                               allow_unmatched_labels=False, conv_mask_to_poly=False)
    _, remapped = mapper.validate_and_remap(function.detect(context(), image), 5)
    assert [(s.frame, s.source) for s in remapped] == [(5, "auto")] * len(segments)
    spec_ids = [label.id for label in function.spec.labels]
    assert sorted({s.label_id for s in remapped}) == [1000 + spec_ids.index(c) for c in present]
    with pytest.raises(BadFunctionError, match="is not in dataset"):  # a task without all the classes
        _AnnotationMapper(logging.getLogger("cvat"), function.spec.labels, dataset_labels(names[:1], "any"),
                          allow_unmatched_labels=False, conv_mask_to_poly=False)
    lean = _AnnotationMapper(logging.getLogger("cvat"), function.spec.labels, dataset_labels(names[:1], "any"),
                             allow_unmatched_labels=True, conv_mask_to_poly=False)
    first = function.spec.labels[0].id
    assert len(lean.validate_and_remap(function.detect(context(), image), 0)[1]) == sum(
        s["category_id"] == first for s in segments)


def test_the_threshold_polygons_and_the_pixel_bound(function, small_world):
    function, checkpoint = function
    record = load_dataset(small_world).split("val").records[0]
    ids, segments = expected(function, record.image_path.read_bytes())
    image = PIL.Image.open(record.image_path)
    scores = sorted(s["score"] for s in segments)
    middle = scores[len(scores) // 2]
    kept = function.detect(context(conf_threshold=middle), image)
    assert 0 < len(kept) == sum(score >= middle for score in scores)
    assert function.detect(context(conf_threshold=1.0), image) == []

    polygons = function.detect(context(conv_mask_to_poly=True), image)
    assert polygons and all(shape.type.value == "polygon" for shape in polygons)
    names = [label.name for label in function.spec.labels]
    mapper = _AnnotationMapper(logging.getLogger("cvat"), function.spec.labels, dataset_labels(names, "polygon"),
                               allow_unmatched_labels=False, conv_mask_to_poly=True)
    mapper.validate_and_remap(function.detect(context(conv_mask_to_poly=True), image), 0)  # CVAT's checks pass
    with pytest.raises(BadFunctionError, match=r"type 'mask' \(expected 'polygon'\)"):  # the check can fail
        mapper.validate_and_remap(function.detect(context(), image), 0)
    for segment in segments:
        drawn = np.zeros(ids.shape, bool)
        for shape in polygons:
            if shape.label_id == segment["category_id"]:
                drawn |= polygon_mask(np.reshape(shape.points, (-1, 2)), *ids.shape)
        assert drawn[ids == segment["id"]].all()  # every pixel of the segment lies in a polygon of its class

    small = FunctionLoader(MODULE, None, {"checkpoint": str(checkpoint), "max_pixels": 100}).load()
    with pytest.raises(DataError, match=r"frame\.png: 64×64 pixels exceed max_pixels=100"):
        small.detect(context(), image)
