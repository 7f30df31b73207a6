"""Pictures of panoptic predictions and of training: overlays, side-by-side panels, loss curves.

Plain numpy/PIL (matplotlib for the loss curve only). An overlay blends a colour per segment over the
image, draws segment borders and writes the class name at a point well inside each large enough
segment; it changes only labeled pixels (segment id != 0), so unlabeled areas show the image as it is.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from dearli.data.coco_format import VOID_ID, rgb2id
from dearli.errors import DataError

BLEND = 0.55  # weight of the segment colour over the image
BORDER = (255, 255, 255)  # segment borders
LABEL_BOX = (0, 0, 0)  # background of class names, for legibility on any colour
LABEL_TEXT = (255, 255, 255)
MIN_PANEL_HEIGHT = 256  # small images are enlarged (nearest) so class names stay readable
MIN_LABEL_AREA_FRACTION = 0.002  # segments smaller than this share of the image get no name
_GOLDEN = 0.618033988749895  # hue step between consecutive segment ids: neighbours get distant hues


def segment_colour(segment_id: int) -> tuple[int, int, int]:
    """A saturated colour for a segment id, stable across images (ids 1, 2, 3 ... differ strongly)."""
    hue = (int(segment_id) * _GOLDEN) % 1.0
    value = 0.95 if int(segment_id) % 2 else 0.75
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
    return int(r * 255), int(g * 255), int(b * 255)


def _borders(panoptic: np.ndarray) -> np.ndarray:
    """H×W bool: labeled pixels with a 4-neighbour of another segment id."""
    edge = np.zeros(panoptic.shape, dtype=bool)
    vertical = panoptic[1:] != panoptic[:-1]
    horizontal = panoptic[:, 1:] != panoptic[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge & (panoptic != VOID_ID)


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel deepest inside ``mask`` (H×W bool): the centre of a convex segment, and still
    inside a ring or a crescent, where the centroid would not be."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(x), int(y)


def _name(class_names: Mapping[int, str] | Sequence[str], category_id: int) -> str:
    try:
        return str(class_names[int(category_id)])
    except (KeyError, IndexError):
        return str(category_id)


def _font(size: int) -> ImageFont.ImageFont:
    """PIL's default font at ``size`` px (a fixed small bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _fit(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int]:
    """Shift (dx, dy) that moves ``box`` (left, top, right, bottom) inside a width×height image."""
    left, top, right, bottom = box
    dx = max(0, -left) - max(0, right - (width - 1))
    dy = max(0, -top) - max(0, bottom - (height - 1))
    return dx, dy


def _draw_labels(canvas: Image.Image, panoptic: np.ndarray, segments: Sequence[dict],
                 class_names: Mapping[int, str] | Sequence[str]) -> None:
    """Write class names onto ``canvas``, centred on each segment's deepest pixel, largest segments first.

    A name is left out when its segment is tiny, when its box would cover another name, or when more than
    a tenth of its box lies on unlabeled pixels (the overlay leaves those untouched, which would cut it).
    """
    height, width = panoptic.shape
    font = _font(max(10, min(height, width) // 20))
    draw = ImageDraw.Draw(canvas)
    areas = {seg["id"]: int((panoptic == seg["id"]).sum()) for seg in segments}
    placed: list[tuple[int, int, int, int]] = []
    for seg in sorted(segments, key=lambda s: -areas[s["id"]]):
        if areas[seg["id"]] < MIN_LABEL_AREA_FRACTION * height * width:
            continue
        x, y = _label_point(panoptic == seg["id"])
        text = _name(class_names, seg["category_id"])
        left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="mm")
        box = (int(left) - 2, int(top) - 1, int(right) + 2, int(bottom) + 1)
        dx, dy = _fit(box, width, height)
        box = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
        overlaps = any(box[0] <= b[2] and b[0] <= box[2] and box[1] <= b[3] and b[1] <= box[3] for b in placed)
        covered = panoptic[max(box[1], 0):box[3] + 1, max(box[0], 0):box[2] + 1]
        if overlaps or covered.size == 0 or (covered == VOID_ID).mean() > 0.1:
            continue
        draw.rectangle(box, fill=LABEL_BOX)
        draw.text((x + dx, y + dy), text, font=font, fill=LABEL_TEXT, anchor="mm")
        placed.append(box)


def overlay(image: np.ndarray, panoptic: np.ndarray, segments: Sequence[dict],
            class_names: Mapping[int, str] | Sequence[str]) -> np.ndarray:
    """Colour per segment blended over the image, borders, class names at segment centres.

    Args:
        image: H×W×3 uint8 RGB.
        panoptic: H×W integer segment ids, 0 = unlabeled.
        segments: dicts with "id" and "category_id" (segments_info entries).
        class_names: category id -> display name (a dict, or a list indexed by id).
    Returns:
        H×W×3 uint8; equal to ``image`` wherever ``panoptic`` is 0.
    """
    if image.shape[:2] != panoptic.shape:
        raise ValueError(f"image {image.shape[:2]} and panoptic {panoptic.shape} differ in size")
    out = image.astype(np.float32)
    for seg in segments:
        mask = panoptic == seg["id"]
        out[mask] = (1 - BLEND) * out[mask] + BLEND * np.asarray(segment_colour(seg["id"]), np.float32)
    out[_borders(panoptic)] = BORDER
    canvas = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    _draw_labels(canvas, panoptic, segments, class_names)
    result = np.array(canvas)
    # Names near a segment's edge may reach unlabeled pixels: keep those exactly as in the image.
    void = panoptic == VOID_ID
    result[void] = image[void]
    return result


def _enlarge(array: np.ndarray, factor: int) -> np.ndarray:
    return array if factor == 1 else np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def _titled(panel: np.ndarray, title: str, font: ImageFont.ImageFont) -> np.ndarray:
    header = Image.new("RGB", (panel.shape[1], 22), (32, 32, 32))
    ImageDraw.Draw(header).text((6, 11), title, font=font, fill=LABEL_TEXT, anchor="lm")
    return np.concatenate([np.array(header), panel], axis=0)


def side_by_side(image: np.ndarray, pred_panoptic: np.ndarray, pred_segments: Sequence[dict],
                 gt_panoptic: np.ndarray | None, gt_segments: Sequence[dict],
                 class_names: Mapping[int, str] | Sequence[str]) -> np.ndarray:
    """Input | prediction overlay | ground-truth overlay (omitted when ``gt_panoptic`` is None), titled.

    Images lower than MIN_PANEL_HEIGHT are enlarged by an integer factor first (nearest neighbour).
    Returns: (22 + k·H)×(n·k·W + gaps)×3 uint8.
    """
    factor = max(1, -(-MIN_PANEL_HEIGHT // image.shape[0]))
    big = _enlarge(image, factor)
    panels = [("input", big), ("prediction", overlay(big, _enlarge(pred_panoptic, factor), pred_segments,
                                                     class_names))]
    if gt_panoptic is not None:
        panels.append(("ground truth", overlay(big, _enlarge(gt_panoptic, factor), gt_segments, class_names)))
    font = _font(14)
    gap = np.full((big.shape[0] + 22, 6, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for title, panel in panels:
        parts += [gap] if parts else []
        parts.append(_titled(panel, title, font))
    return np.concatenate(parts, axis=1)


def _read_png_ids(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return rgb2id(np.array(img.convert("RGB")))
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot read panoptic PNG ({err})") from None


def write_visualisations(split: Any, pred_json: str | Path, pred_dir: str | Path, out_dir: str | Path,
                         max_images: int = 4) -> list[Path]:
    """Side-by-side PNGs (input | prediction | ground truth) of the first ``max_images`` predicted images.

    ``split`` is a PanopticSplit (images, ground truth, class names); the predictions are read from a COCO
    panoptic JSON and its PNG folder, as the evaluation writes them. Returns the written paths.
    """
    try:
        predictions = json.loads(Path(pred_json).read_text(encoding="utf-8"))["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(pred_json, f"cannot read predictions ({err})") from None
    by_id = {str(a["image_id"]): a for a in predictions}
    by_stem = {Path(str(a.get("file_name", ""))).stem: a for a in predictions}  # e.g. pseudo-labels: id = stem
    names = {c.id: c.name for c in split.categories.categories}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for record in split.records:
        if len(written) >= max_images:
            break
        pred = by_id.get(str(record.image_id)) or by_stem.get(record.stem)
        if pred is None:
            continue
        image = split.load_image(record)
        gt, gt_segments = None, []
        if record.panoptic_path is not None:
            gt = split.load_segment_map(record)
            gt_segments = [{"id": s.id, "category_id": s.category_id} for s in record.segments_info]
        picture = side_by_side(image, _read_png_ids(Path(pred_dir) / pred["file_name"]), pred["segments_info"],
                               gt, gt_segments, names)
        path = out_dir / f"{record.stem}.png"
        Image.fromarray(picture).save(path)
        written.append(path)
    return written


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Plot ``loss`` and every ``loss_*`` value over ``step`` from a run's metrics.jsonl into ``out_png``.

    Returns the PNG's path, or None (nothing written) when the file holds no loss values.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    try:
        lines = Path(metrics_jsonl).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(metrics_jsonl, f"cannot read metrics ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(metrics_jsonl, f"line {number} is not JSON") from None
        for key, value in record.items():
            if (key == "loss" or key.startswith("loss_")) and isinstance(value, (int, float)) and "step" in record:
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    if not series:
        return None
    return _plot_series(series, Path(out_png), title=Path(metrics_jsonl).parent.name)


def _plot_series(series: dict[str, tuple[list[int], list[float]]], out_png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in sorted(series, key=lambda k: (k != "loss", k)):
        steps, values = series[key]
        ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss ({title})" if title else "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
