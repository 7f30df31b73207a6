"""Dense CLIP features for the cache and the geometry to use them (no Ray here).

What is stored: the backbone's raw ``clip_vis_dense`` (C5×h×w, float16) of the image resized by the
test-time rule (shortest edge -> ``short_side``, longest capped at ``max_size``) and padded bottom/right
to ``size_divisibility`` with the pixel mean. Raw rather than projected because CLIP's head
(LayerNorm + projection) is not linear: FC-CLIP pools inside a mask FIRST and then projects the pooled
vector (``visual_prediction``), and projecting per pixel before pooling would give a different answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dearli.caches.records import TEXT_SCHEMA
from dearli.config_model import BackboneConfig
from dearli.model.backbone import DENSE_FEATURE, FrozenClipBackbone, build_backbone
from dearli.model.inference import pad_to_multiple, resize_shortest_edge
from dearli.model.text_classifier import TextEmbeddings, class_text_embeddings, text_cache_dir

RANDOM_INIT_SEED = 0  # random-weight backbones are seeded so every worker (and the reader) builds the same


def clip_settings(clip_model: str, pretrained: str, short_side: int, max_size: int,
                  size_divisibility: int) -> dict[str, Any]:
    """The settings recorded in a CLIP cache's manifest (all of them change the stored features)."""
    return {"clip_model": clip_model, "pretrained": pretrained, "short_side": int(short_side),
            "max_size": int(max_size), "size_divisibility": int(size_divisibility),
            "feature": DENSE_FEATURE, "dtype": "float16"}


def build_cache_backbone(clip_model: str, pretrained: str) -> FrozenClipBackbone:
    """The frozen backbone; with no pretrained weights, a seeded random init identical in every process."""
    cfg = BackboneConfig(clip_model=clip_model, pretrained=pretrained)
    if pretrained:
        return build_backbone(cfg)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(RANDOM_INIT_SEED)
        return build_backbone(cfg)


def dense_feature(backbone: FrozenClipBackbone, image: np.ndarray, settings: dict[str, Any]
                  ) -> tuple[np.ndarray, float, tuple[int, int], tuple[int, int]]:
    """image H×W×3 uint8 -> (feature C×h×w float16, scale, resized (h', w'), padded (H_pad, W_pad))."""
    device = backbone._mean.device
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
    x = resize_shortest_edge(x, settings["short_side"], settings["max_size"])
    resized = (int(x.shape[-2]), int(x.shape[-1]))
    x = pad_to_multiple(x, settings["size_divisibility"], backbone.pixel_mean)
    padded = (int(x.shape[-2]), int(x.shape[-1]))
    feature = backbone(x)[DENSE_FEATURE][0]
    scale = resized[0] / image.shape[0]
    return feature.to(torch.float16).cpu().numpy(), scale, resized, padded


def masks_to_feature_frame(masks: np.ndarray, row: dict[str, Any]) -> torch.Tensor:
    """N×H×W bool masks in original pixels -> N×H_pad×W_pad ±1 logits in the cached feature's frame.

    The masks are resized like the image (bilinear), padded with "outside" (-1); ``mask_pool`` then
    resizes them to the feature grid and binarises at 0, as it does for decoder mask logits.
    """
    resized = tuple(int(v) for v in row["resized_hw"])
    padded = tuple(int(v) for v in row["padded_hw"])
    x = torch.from_numpy(np.ascontiguousarray(masks)).float()[None] * 2 - 1
    if x.shape[1] == 0:
        return torch.zeros(0, *padded)
    x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False)
    out = torch.full((1, x.shape[1], *padded), -1.0)
    out[..., : resized[0], : resized[1]] = x
    return out[0]


def text_table(backbone: FrozenClipBackbone, synonyms: list[tuple[str, ...]], category_ids: list[int]) -> pa.Table:
    """Text embeddings of a class list as a table: one row per synonym (class index, category id, text)."""
    text = class_text_embeddings(backbone, [list(s) for s in synonyms], text_cache_dir())
    rows = []
    flat = [s for syns in synonyms for s in syns]
    for row, (emb, k) in enumerate(zip(text.embeddings.cpu().float(), text.synonym_to_class.tolist())):
        rows.append({"class_index": int(k), "category_id": int(category_ids[k]), "synonym": flat[row],
                     "embedding": emb.numpy().tolist()})
    return pa.Table.from_pylist(rows, schema=TEXT_SCHEMA)


def text_embeddings_from_table(table: pa.Table) -> TextEmbeddings:
    """Inverse of :func:`text_table`: the ``TextEmbeddings`` the zero-shot classifier takes."""
    emb = torch.tensor(np.array(table.column("embedding").to_pylist(), dtype=np.float32))
    index = torch.tensor(table.column("class_index").to_pylist(), dtype=torch.long)
    return TextEmbeddings(emb, index)


def write_text_table(uri: str, settings: dict[str, Any], categories: Any) -> None:
    """Write ``text.parquet`` (text embeddings of ``categories``, a CategoryMap) beside a CLIP cache.

    An existing table made for the same class list is kept; one for another class list is an error
    (the cache's features stay valid, but its text table must match the dataset it is used with).
    """
    import pyarrow.parquet as pq

    from dearli.caches.readers import TEXT_FILE
    from dearli.caches.store import CacheStore, parquet_bytes, write_atomic
    from dearli.errors import ConfigError

    store = CacheStore(uri)
    synonyms = [tuple(c.synonyms) for c in categories.categories]
    ids = [int(c.id) for c in categories.categories]
    final = store.path(TEXT_FILE)
    if store.fs.get_file_info(final).type.name == "File":
        old = pq.read_table(final, columns=["category_id", "synonym"], filesystem=store.fs)
        if old.column("synonym").to_pylist() != [s for syns in synonyms for s in syns] or \
                sorted(set(old.column("category_id").to_pylist())) != sorted(ids):
            raise ConfigError(f"{final}: holds text embeddings of another class list; use a new cache location")
        return
    backbone = build_cache_backbone(settings["clip_model"], settings["pretrained"])
    table = text_table(backbone, synonyms, ids)
    write_atomic(final, parquet_bytes(table), store.fs)
