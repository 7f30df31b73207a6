"""The review page of a labelled folder: one self-contained HTML file plus overlay images, no server needed.

Items come from a ``dearli pseudo-label`` output (its committed rows: image path, segments with scores) or a
``dearli predict`` output (its ``panoptic.json``, images found in the dataset split it predicted). The page
lists the images least sure first (an image's confidence is the area-weighted mean of its segments' class
scores), shows per-class segment counts and score histograms, the decoder-vs-CLIP disagreement of each image
when it was measured, and filters by class and re-sorts in the browser (a few lines of inline JavaScript).

Every value taken from the labels (stems, class names and ids, numbers) is HTML-escaped, and file names in
links are URL-encoded. Each file is published whole (a temporary file, then a rename), the page last.
"""

from __future__ import annotations

import html
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from dearli.caches.store import remove_temporaries, write_atomic
from dearli.data.coco_format import rgb2id
from dearli.errors import DataError

HISTOGRAM_BINS = 10  # class-score histogram bins over [0, 1]
OVERLAY_ALPHA = 0.5  # weight of a segment's colour over the image


@dataclass
class ReviewItem:
    """One labelled image: where its picture and label PNG are, and its segments (dataset category ids)."""

    stem: str
    image_path: Path
    label_path: Path
    segments: list[dict]  # {"id", "category_id", "category_name", "isthing", "score", "area"}
    signals: dict[str, float] = field(default_factory=dict)  # e.g. {"disagreement": ...} when measured

    @property
    def confidence(self) -> float:
        """Area-weighted mean class score of the segments; 0 for an image without any."""
        area = sum(s["area"] for s in self.segments)
        return sum(s["score"] * s["area"] for s in self.segments) / area if area else 0.0


def segment_colour(segment_id: int, category_id: int) -> tuple[int, int, int]:
    """A colour per segment that stays the same for the same (id, class) on every page (ids of any type)."""
    try:
        seed = int(segment_id) * 1009 + int(category_id)
    except (TypeError, ValueError):
        seed = zlib.crc32(f"{segment_id}/{category_id}".encode())
    rng = np.random.default_rng(abs(seed))
    return tuple(int(c) for c in rng.integers(40, 256, 3))


def overlay(image: np.ndarray, ids: np.ndarray, segments: list[dict]) -> np.ndarray:
    """H×W×3 uint8 image + H×W segment ids -> the image with each segment tinted and outlined (H×W×3 uint8)."""
    out = image.astype(np.float32)
    for seg in segments:
        mask = ids == seg["id"]
        colour = np.array(segment_colour(seg["id"], seg["category_id"]), dtype=np.float32)
        out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * colour
    edge = np.zeros(ids.shape, dtype=bool)  # pixels whose right or lower neighbour is another segment
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    out[edge] = 255
    return out.astype(np.uint8)


def class_table(items: list[ReviewItem]) -> list[dict]:
    """Per class: name, segment count, images, mean score and the score histogram (HISTOGRAM_BINS counts)."""
    classes: dict[int, dict] = {}
    for item in items:
        for seg in item.segments:
            entry = classes.setdefault(seg["category_id"], {"category_id": seg["category_id"], "name":
                                       seg["category_name"], "segments": 0, "images": set(), "scores": []})
            entry["segments"] += 1
            entry["images"].add(item.stem)
            entry["scores"].append(float(seg["score"]))
    table = []
    for entry in sorted(classes.values(), key=lambda e: (-e["segments"], e["name"])):
        scores = np.array(entry["scores"])
        hist = np.histogram(np.clip(scores, 0, 1), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]
        table.append({"category_id": entry["category_id"], "name": entry["name"], "segments": entry["segments"],
                      "images": len(entry["images"]), "mean_score": float(scores.mean()),
                      "histogram": hist.tolist()})
    return table


def histogram_svg(counts: list[int], width: int = 120, height: int = 28) -> str:
    """A tiny inline SVG bar chart of score-histogram counts (bins over [0, 1], left to right)."""
    top = max(max(counts), 1)
    bar = width / len(counts)
    rects = "".join(f'<rect x="{i * bar:.1f}" y="{height - height * c / top:.1f}" width="{bar - 1:.1f}" '
                    f'height="{height * c / top:.1f}"/>' for i, c in enumerate(counts))
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'aria-label="scores 0 to 1">{rects}</svg>')


def readable(items: list[ReviewItem]) -> tuple[list[ReviewItem], list[str]]:
    """(the items whose picture and label PNG both exist, one line per item left out: stem and missing file)."""
    kept, missing = [], []
    for item in items:
        absent = next((p for p in (item.image_path, item.label_path) if not Path(p).is_file()), None)
        if absent is None:
            kept.append(item)
        else:
            missing.append(f"{item.stem}: {absent} not found")
    return kept, missing


def write_overlays(items: list[ReviewItem], out: Path) -> None:
    """OUT/images/<stem>.png: each item's overlay (the image at its label's size)."""
    for item in items:
        ids = rgb2id(np.asarray(Image.open(item.label_path).convert("RGB")))
        with Image.open(item.image_path) as picture:
            image = np.asarray(picture.convert("RGB").resize((ids.shape[1], ids.shape[0])))
        buffer = io.BytesIO()
        Image.fromarray(overlay(image, ids, item.segments)).save(buffer, format="PNG")
        write_atomic(out / "images" / f"{item.stem}.png", buffer.getvalue())


_SCRIPT = """
const cards = Array.from(document.querySelectorAll('.card'));
const grid = document.getElementById('grid');
function apply() {
  const cls = document.getElementById('cls').value, key = document.getElementById('sort').value;
  let shown = 0;
  for (const card of cards) {
    const on = cls === '' || card.dataset.classes.split(' ').includes(cls);
    card.hidden = !on; shown += on;
  }
  const value = (c) => key === 'name' ? c.dataset.stem : Number(c.dataset[key]);
  const sorted = cards.slice().sort((a, b) => key === 'disagreement' ? value(b) - value(a)
      : key === 'name' ? value(a).localeCompare(value(b)) : value(a) - value(b));
  for (const card of sorted) grid.appendChild(card);
  document.getElementById('count').textContent = shown + ' of ' + cards.length + ' images';
}
document.getElementById('cls').addEventListener('change', apply);
document.getElementById('sort').addEventListener('change', apply);
for (const link of document.querySelectorAll('a.pick')) link.addEventListener('click', (e) => {
  e.preventDefault(); document.getElementById('cls').value = link.dataset.cls; apply();
});
apply();
"""

_STYLE = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}h1{font-size:20px;margin:0 0 4px}
.muted{color:#666}table{border-collapse:collapse;margin:8px 0 16px}td,th{padding:2px 8px;text-align:left}
th{border-bottom:1px solid #ccc}.hist rect{fill:#4a7bd0}.bar{margin:8px 0}select{margin-right:12px}
#grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:260px;border:1px solid #ddd;border-radius:6px;padding:6px}
.card img{width:100%;image-rendering:pixelated;border-radius:4px}.card ul{margin:4px 0;padding-left:18px}
.low{color:#b00020;font-weight:600}.stem{font-weight:600;word-break:break-all}
"""


def _esc(value: Any) -> str:
    """``value`` as text safe in HTML content and in quoted attributes."""
    return html.escape(str(value), quote=True)


def overlay_link(stem: str) -> str:
    """The page's relative link to a stem's overlay, URL-encoded (stems may hold '#', '?', '%', spaces)."""
    return "images/" + quote(f"{stem}.png", safe="")


def _card(item: ReviewItem) -> str:
    classes = " ".join(sorted({str(s["category_id"]) for s in item.segments}))
    disagreement = item.signals.get("disagreement")
    rows = "".join(
        f'<li><span class="{"low" if float(s["score"]) < 0.5 else ""}">{float(s["score"]):.2f}</span> '
        f'{_esc(s["category_name"])}{" (thing)" if s["isthing"] else ""}, {_esc(s["area"])} px</li>'
        for s in sorted(item.segments, key=lambda s: float(s["score"])))
    extra = f" · disagreement {float(disagreement):.3f}" if disagreement is not None else ""
    return (f'<div class="card" data-stem="{_esc(item.stem)}" data-classes="{_esc(classes)}" '
            f'data-confidence="{item.confidence:.6f}" data-disagreement="{float(disagreement or 0):.6f}">'
            f'<img src="{_esc(overlay_link(item.stem))}" alt="{_esc(item.stem)}" loading="lazy">'
            f'<div class="stem">{_esc(item.stem)}</div>'
            f'<div class="muted">confidence {item.confidence:.2f}{extra} · {len(item.segments)} segments</div>'
            f'<ul>{rows or "<li>no segment</li>"}</ul></div>')


def render_page(items: list[ReviewItem], title: str) -> str:
    """The review page's HTML: summary, class table with histograms, filter/sort controls, one card per item."""
    items = sorted(items, key=lambda i: (i.confidence, i.stem))  # least sure first, also without JavaScript
    table = class_table(items)
    measured = any("disagreement" in i.signals for i in items)
    rows = "".join(f'<tr><td><a href="#" class="pick" data-cls="{_esc(c["category_id"])}">{_esc(c["name"])}</a>'
                   f'</td><td>{c["segments"]}</td><td>{c["images"]}</td><td>{c["mean_score"]:.2f}</td>'
                   f'<td>{histogram_svg(c["histogram"])}</td></tr>' for c in table)
    options = "".join(f'<option value="{_esc(c["category_id"])}">{_esc(c["name"])} ({c["segments"]})</option>'
                      for c in table)
    sorts = '<option value="confidence">least sure first</option>'
    sorts += '<option value="disagreement">decoder vs CLIP disagreement</option>' if measured else ""
    sorts += '<option value="name">name</option>'
    segments = sum(len(i.segments) for i in items)
    note = "" if measured else " · disagreement not measured (pass --checkpoint)"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<style>{_STYLE}</style></head><body><h1>{_esc(title)}</h1>'
            f'<div class="muted">{len(items)} images · {segments} segments · mean confidence '
            f'{np.mean([i.confidence for i in items]) if items else 0:.2f}{note}</div>'
            f'<h2>Classes</h2><table><tr><th>class</th><th>segments</th><th>images</th><th>mean score</th>'
            f'<th>score histogram (0 → 1)</th></tr>{rows}</table>'
            f'<div class="bar">class <select id="cls"><option value="">all classes</option>{options}</select>'
            f'sort <select id="sort">{sorts}</select><span id="count" class="muted"></span></div>'
            f'<div id="grid">{"".join(_card(i) for i in items)}</div>'
            f'<script>{_SCRIPT}</script></body></html>')


def refuse_existing_page(out: Path) -> Path:
    """OUT/index.html, or DataError if it exists (an earlier page is never replaced, not even in part)."""
    page = out / "index.html"
    if page.exists():
        raise DataError(page, "exists already; choose another --out (nothing is replaced)")
    return page


def write_review(items: list[ReviewItem], out: Path, title: str) -> Path:
    """OUT/images/, OUT/review.json, then OUT/index.html: overlays, class table and page; the page's path.

    A killed run leaves no page (only files a rerun replaces); an existing page is refused before any write.
    """
    page = refuse_existing_page(out)
    for folder in (out, out / "images"):
        if folder.is_dir():
            remove_temporaries(folder)  # of a killed earlier run
    write_overlays(items, out)
    write_atomic(out / "review.json", json.dumps({"images": len(items), "classes": class_table(items)},
                                                 indent=2).encode())
    write_atomic(page, render_page(items, title).encode())
    return page
