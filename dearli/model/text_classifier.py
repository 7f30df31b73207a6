"""M2F-Lang classification: queries scored by cosine similarity to CLIP text embeddings of class names.

Class names come as synonym lists (``[["person", "man"], ["sky"], ...]``). Each synonym is embedded
with the 14 ViLD prompt templates (each prompt L2-normalised, averaged, renormalised); a class scores the
MAX over its synonyms, as in OpenSeg / ODISE / FC-CLIP. ``synonym_to_class`` (S,) maps every embedding
row to its class index.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dearli.config_model import ClassifierConfig
from dearli.errors import DataError

# ViLD prompt ensemble (Gu et al., 2022), as used by FC-CLIP and DEARLi.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


class TextEmbeddings(NamedTuple):
    embeddings: torch.Tensor  # S×D, L2-normalised, one row per synonym
    synonym_to_class: torch.Tensor  # (S,) long, class index of each row


# Per backbone instance (weakly held: randomly initialised backbones of the same name differ), then per
# (class list, text-tower weight fingerprint): loading a checkpoint into the same instance invalidates it.
# Values live on CPU; callers get a copy on the backbone's device.
_MEMORY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Class lists kept per backbone, least recently used dropped first: a labeling endpoint answering requests
# with many different lists must not grow without bound.
MEMORY_LISTS_PER_BACKBONE = 32
# Guards the cache's bookkeeping (not the encoding): a labeling endpoint encodes lists from several threads.
_CACHE_LOCK = threading.Lock()


def _text_fingerprint(backbone: nn.Module) -> tuple[float, ...]:
    """Cheap summary of the weights encode_text depends on (everything but the vision tower)."""
    with torch.no_grad():
        params = [p for n, p in backbone.named_parameters() if ".visual." not in f".{n}"]
        if not params:
            return ()
        return (float(sum(p.double().sum() for p in params)), float(sum(p.double().abs().sum() for p in params)))


def _check_class_names(class_names: list[list[str]]) -> tuple[tuple[str, ...], ...]:
    if not class_names:
        raise DataError("class names", "the class list is empty")
    key = []
    for index, synonyms in enumerate(class_names):
        if isinstance(synonyms, str):
            synonyms = [synonyms]
        if not synonyms or not all(isinstance(s, str) and s.strip() for s in synonyms):
            raise DataError("class names", f"class {index} needs at least one non-empty name, got {synonyms!r}")
        key.append(tuple(synonyms))
    return tuple(key)


def _encode(backbone: nn.Module, names: tuple[tuple[str, ...], ...]) -> TextEmbeddings:
    synonyms = [(k, s) for k, syns in enumerate(names) for s in syns]
    prompts = [t.format(s) for _, s in synonyms for t in VILD_TEMPLATES]
    per_prompt = F.normalize(backbone.encode_text(prompts).float().cpu(), dim=-1)
    mean = per_prompt.view(len(synonyms), len(VILD_TEMPLATES), -1).mean(1)
    index = torch.tensor([k for k, _ in synonyms], dtype=torch.long)
    return TextEmbeddings(F.normalize(mean, dim=-1), index)


def text_cache_dir() -> Path:
    """Where class text embeddings of pretrained CLIPs are kept between processes: ``$DEARLI_TEXT_CACHE``, else
    ``$XDG_CACHE_HOME/dearli/text``, else ``~/.cache/dearli/text``. A 150-class vocabulary with synonyms is
    ~5,600 prompts through the text tower (minutes on a CPU for ConvNeXt-B); every Train worker, teacher
    actor and evaluation of a run needs the same embeddings."""
    if os.environ.get("DEARLI_TEXT_CACHE"):
        return Path(os.environ["DEARLI_TEXT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dearli" / "text"


def _cache_file(backbone: nn.Module, names: tuple, fingerprint: tuple, cache_dir: str | Path) -> Path | None:
    pretrained = getattr(backbone, "pretrained", "")
    if not pretrained:  # random weights: one file per process would pile up, never to be read again
        return None
    # The text weights' fingerprint is in the key: a file replaced at the same path gets new embeddings.
    blob = json.dumps([getattr(backbone, "model_name", ""), pretrained, fingerprint, VILD_TEMPLATES, names])
    return Path(cache_dir) / f"text_{hashlib.sha1(blob.encode()).hexdigest()[:16]}.pt"


def class_text_embeddings(backbone: nn.Module, class_names: list[list[str]],
                          cache_dir: str | Path | None = None) -> TextEmbeddings:
    """Synonym lists (K classes) -> ``TextEmbeddings(S×D normalised, synonym_to_class (S,))``.

    Cached in memory per (backbone instance, class list, text weights); with ``cache_dir`` also on disk for
    pretrained backbones (keyed by model name, tag, text weights, templates and names; written atomically,
    an existing file is read, never rewritten).
    """
    names = _check_class_names(class_names)
    fingerprint = _text_fingerprint(backbone)
    key = (names, fingerprint)
    with _CACHE_LOCK:
        per_backbone = _MEMORY_CACHE.setdefault(backbone, {})
        cached = per_backbone.pop(key, None)
        if cached is not None:
            per_backbone[key] = cached  # most recently used last
    if cached is None:
        path = _cache_file(backbone, names, fingerprint, cache_dir) if cache_dir is not None else None
        if path is not None and path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            cached = TextEmbeddings(stored["embeddings"], stored["synonym_to_class"])
        else:
            cached = _encode(backbone, names)
            if path is not None:
                _save_atomically(cached._asdict(), path)
        with _CACHE_LOCK:
            per_backbone.pop(key, None)
            while len(per_backbone) >= MEMORY_LISTS_PER_BACKBONE:
                per_backbone.pop(next(iter(per_backbone)))
            per_backbone[key] = cached
    device = next(iter(backbone.buffers()), torch.empty(0)).device
    return TextEmbeddings(cached.embeddings.to(device), cached.synonym_to_class.to(device))


def _save_atomically(values: dict, path: Path) -> None:
    """Processes that compute the same embeddings at once each write a file of their own, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(values, tmp)
    os.replace(tmp, path)


def synonym_table(synonym_to_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(S,) class index per synonym -> K×M table of synonym rows per class, padded with -1."""
    counts = torch.bincount(synonym_to_class, minlength=num_classes)
    if counts.numel() != num_classes or bool((counts == 0).any()):
        raise ValueError(f"every one of the {num_classes} classes needs >= 1 synonym; counts {counts.tolist()}")
    order = torch.argsort(synonym_to_class, stable=True)
    slot = torch.arange(order.numel(), device=order.device) - (torch.cumsum(counts, 0) - counts)[
        synonym_to_class[order]]
    table = torch.full((num_classes, int(counts.max())), -1, dtype=torch.long, device=order.device)
    table[synonym_to_class[order], slot] = order
    return table


def reduce_synonyms(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """...×S per-synonym logits -> ...×K, each class taking the max over its synonyms (table K×M)."""
    if table.shape[1] == 1:
        return logits[..., table[:, 0]]
    gathered = logits[..., table.clamp(min=0)]  # ...×K×M
    return gathered.masked_fill(table < 0, float("-inf")).amax(-1)


def class_embed_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> nn.Sequential:
    """MLP (ReLU between layers) projecting decoder queries into the CLIP space, as FC-CLIP's class_embed."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TextClassifier(nn.Module):
    """Query features B×Q×hidden -> class logits B×Q×(K+1), void last.

    logits = clamp(exp(logit_scale), max) · cos(MLP(query), text), max over a class's synonyms; the void
    column is the cosine to a learned embedding. The text embeddings are a non-persistent buffer: a
    checkpoint does not pin the vocabulary, and ``set_text_embeddings`` swaps in another class list.
    """

    def __init__(self, hidden_dim: int, embed_dim: int, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.class_embed = class_embed_mlp(hidden_dim, hidden_dim, embed_dim)
        self.void_embedding = nn.Parameter(torch.randn(1, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.logit_scale_max = float(cfg.logit_scale_max)
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        self.register_buffer("synonym_to_class", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("_table", torch.zeros(0, 1, dtype=torch.long), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self._table.shape[0])

    def set_text_embeddings(self, embeddings: torch.Tensor, synonym_to_class: torch.Tensor | None = None) -> None:
        """Install S×D text embeddings (normalised here) with their class index (S,); default one per class."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.void_embedding.shape[1]:
            raise ValueError(f"text embeddings must be S×{self.void_embedding.shape[1]}, got {tuple(embeddings.shape)}")
        if synonym_to_class is None:
            synonym_to_class = torch.arange(embeddings.shape[0])
        if synonym_to_class.shape != embeddings.shape[:1]:
            raise ValueError("synonym_to_class must have one entry per embedding row")
        device = self.void_embedding.device
        synonym_to_class = synonym_to_class.to(device=device, dtype=torch.long)
        self.text_embeddings = F.normalize(embeddings.detach().to(device, torch.float32), dim=-1)
        self.synonym_to_class = synonym_to_class
        self._table = synonym_table(synonym_to_class, int(synonym_to_class.max()) + 1)

    def scale(self) -> torch.Tensor:
        """The temperature actually applied: clamp(exp(logit_scale), max=logit_scale_max)."""
        return self.logit_scale.exp().clamp(max=self.logit_scale_max)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """queries B×Q×hidden -> logits B×Q×(K+1), void last, always fp32.

        The head runs in fp32 with autocast off: its cosines are multiplied by up to 100, and bf16's
        ~2⁻⁸ rounding of a cosine would move a logit by up to ~0.4. The head is small (an MLP on Q queries
        and one Q×S matmul), so this costs nothing measurable.
        """
        if self.num_classes == 0:
            raise RuntimeError("TextClassifier has no text embeddings; call set_text_embeddings first")
        with torch.autocast(device_type=queries.device.type, enabled=False):
            x = F.normalize(self.class_embed(queries.float()), dim=-1)
            cos = reduce_synonyms(x @ self.text_embeddings.float().t(), self._table)
            void = x @ F.normalize(self.void_embedding.float(), dim=-1).t()
            return self.scale().float() * torch.cat([cos, void], dim=-1)
