"""Frozen OpenCLIP ConvNeXt backbone: multi-scale features for the decoder, CLIP towers for classification.

Any open_clip model whose vision tower is a timm ConvNeXt works (``convnext_base_w``,
``convnext_large_d_320``, ...). ``pretrained`` is an open_clip tag (downloaded by open_clip), a local
checkpoint file (offline), or empty for random weights. dearli ships its own tiny configuration
``dearli-convnext-atto`` (a ConvNeXt-atto trunk and a 2-layer text tower) for tests and CPU runs.

The whole CLIP model is frozen: no parameter requires grad, it stays in eval mode whatever ``.train()``
says (its LayerNorm/drop-path must behave as at pre-training), and feature extraction runs under
``torch.no_grad`` so no activation memory is kept for it.
"""

from __future__ import annotations

import logging
import os
import warnings
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from dearli.config_model import PROJECT_CLIP, BackboneConfig
from dearli.errors import ConfigError, DataError, checkpoint_error

CLIP_CONFIG_DIR = "clip"  # open_clip model configs shipped in dearli/configs/clip/*.json
FEATURE_NAMES = ("res2", "res3", "res4", "res5")
DENSE_FEATURE = "clip_vis_dense"
CLIP_LOGIT_SCALE_MAX = 100.0  # open_clip training clamps exp(logit_scale) to this
TEXT_BATCH = 256  # prompts encoded per text-tower call; bounds memory for large vocabularies
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_RANDOM_INIT_NOTICE = "No pretrained weights loaded"  # how open_clip's random-init warning starts
logger = logging.getLogger(__name__)


class _DropRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" warning.

    It is only installed when ``model.backbone.pretrained`` is empty, where random weights are what the
    config asked for; and when a dearli checkpoint (or a cache's seeded backbone) provides the weights right
    after, the warning is false.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_RANDOM_INIT_NOTICE)


def register_dearli_clip_configs() -> list[str]:
    """Register the open_clip model configs shipped with dearli (idempotent); returns their names."""
    import open_clip

    names = []
    folder = resources.files("dearli.configs") / CLIP_CONFIG_DIR
    known = set(open_clip.list_models())
    for entry in folder.iterdir():
        if not entry.name.endswith(".json"):
            continue
        name = entry.name[: -len(".json")]
        names.append(name)
        if name not in known:
            with resources.as_file(entry) as path:
                open_clip.add_model_config(path)
    return sorted(names)


def _create_clip(model_name: str, pretrained: str) -> nn.Module:
    """``open_clip.create_model`` with user-facing errors for an unknown model or a missing checkpoint."""
    import open_clip

    register_dearli_clip_configs()
    if model_name not in open_clip.list_models() and ":" not in model_name:
        raise ConfigError(f"model.backbone.clip_model: unknown open_clip model {model_name!r}; "
                          f"ConvNeXt choices include {[m for m in open_clip.list_models() if 'convnext' in m]}")
    if pretrained == PROJECT_CLIP:
        raise ConfigError(f"model.backbone.pretrained: {PROJECT_CLIP!r} must be resolved to its checkpoint first "
                          "(the dearli commands do it; in Python: dearli.pretrain.resolve.resolve_clip(cfg))")
    looks_like_path = os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
    if pretrained and looks_like_path and not os.path.isfile(pretrained):
        raise DataError(pretrained, "CLIP checkpoint file not found (model.backbone.pretrained)")
    if pretrained:
        return _open_clip_model(model_name, pretrained)
    # open_clip logs through the root logger (logging.warning); the filter lives there for this call only.
    quiet = _DropRandomInitNotice()
    logging.getLogger().addFilter(quiet)
    try:
        model = _open_clip_model(model_name, "")
    finally:
        logging.getLogger().removeFilter(quiet)
    logger.info("CLIP %s built without pretrained weights (model.backbone.pretrained is empty)", model_name)
    return model


def create_random_clip(model_name: str) -> nn.Module:
    """A randomly initialised open_clip model (dearli's configs registered), without open_clip's notice."""
    return _create_clip(model_name, "")


def _open_clip_model(model_name: str, pretrained: str, device: str = "cpu") -> nn.Module:
    import open_clip

    try:
        return open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
    except Exception as err:  # torch's unpickler and load_state_dict raise several types
        if pretrained and os.path.isfile(pretrained):
            raise checkpoint_error(pretrained, f"open_clip {model_name} (model.backbone.clip_model)", err) from err
        if not isinstance(err, RuntimeError):
            raise
        raise ConfigError(f"model.backbone: cannot build {model_name!r} with pretrained={pretrained!r}: {err}") \
            from err


def check_clip_weights(model_name: str, pretrained: str) -> None:
    """Fail fast, in the calling process, when ``pretrained`` is a local file that is missing or does not hold
    ``model_name``'s weights: the model is built on the meta device (no memory, ~1 s) and the file loaded
    into it, so the names and shapes are checked before workers on other machines try the same."""
    looks_like_path = os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
    if not pretrained or pretrained == PROJECT_CLIP or not looks_like_path:
        return
    if not os.path.isfile(pretrained):
        raise DataError(pretrained, "CLIP checkpoint file not found (model.backbone.pretrained)")
    register_dearli_clip_configs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying ... to a meta parameter ... is a no-op", once per weight
        _open_clip_model(model_name, pretrained, device="meta")


class FrozenClipBackbone(nn.Module):
    """A frozen OpenCLIP model with a timm ConvNeXt vision tower.

    ``forward(images B×3×H×W, RGB in [0, 255])`` returns ``res2..res5`` (strides 4, 8, 16, 32) and
    ``clip_vis_dense`` (B×C5×H/32×W/32, the last stage after the trunk's pre-head norm, the feature FC-CLIP
    mask-pools for ConvNeXt). H and W should be multiples of 32 (see ``dearli.model.inference.pad_to_multiple``).
    """

    def __init__(self, clip_model: nn.Module, model_name: str, pretrained: str = "") -> None:
        super().__init__()
        import open_clip
        import timm.models.convnext as timm_convnext

        trunk = getattr(getattr(clip_model, "visual", None), "trunk", None)
        if not isinstance(trunk, timm_convnext.ConvNeXt):
            raise ConfigError(f"model.backbone.clip_model: {model_name!r} has no timm ConvNeXt vision tower "
                              f"(got {type(trunk).__name__}); dearli needs a ConvNeXt CLIP")
        self.clip = clip_model
        self.model_name = model_name
        self.pretrained = pretrained
        self._tokenizer = None  # loaded on first use: reading the BPE vocabulary costs build time
        preprocess = getattr(clip_model.visual, "preprocess_cfg", {})
        mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
        # Inputs arrive in [0, 255]; CLIP's statistics are for [0, 1].
        self.pixel_mean = tuple(255.0 * float(m) for m in mean)
        self.pixel_std = tuple(255.0 * float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.pixel_std).view(1, 3, 1, 1), persistent=False)

        info = trunk.feature_info
        self.output_shape: dict[str, tuple[int, int]] = {
            name: (int(info[i]["num_chs"]), int(info[i]["reduction"])) for i, name in enumerate(FEATURE_NAMES)
        }
        self.output_shape[DENSE_FEATURE] = self.output_shape["res5"]
        self.lock()
        with torch.no_grad():
            probe = torch.zeros(1, self.output_shape["res5"][0], 1, 1, device=self._mean.device)
            self.embed_dim = int(self.visual_prediction(probe.flatten(1)).shape[-1])

    def lock(self) -> None:
        """Freeze every CLIP parameter (both towers) and put the model in eval mode."""
        for param in self.clip.parameters():
            param.requires_grad_(False)
        self.clip.eval()

    def train(self, mode: bool = True) -> FrozenClipBackbone:
        # The backbone is never trained: keep eval mode so a parent's .train() does not switch it.
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's own (pre-trained) temperature, exponentiated and clamped as in CLIP training: 0-d."""
        return self.clip.logit_scale.detach().exp().clamp(max=CLIP_LOGIT_SCALE_MAX)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images B×3×H×W float RGB in [0, 255] -> {res2..res5, clip_vis_dense} (see class docstring)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images B×3×H×W, got shape {tuple(images.shape)}")
        trunk = self.clip.visual.trunk
        with torch.no_grad():
            x = (images.to(self._mean.dtype) - self._mean) / self._std
            x = trunk.stem(x)
            out = {}
            for name, stage in zip(FEATURE_NAMES, trunk.stages):
                x = stage(x)
                out[name] = x.contiguous()
            out[DENSE_FEATURE] = trunk.norm_pre(x).contiguous()
        return out

    def visual_prediction(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mask-pooled dense features ...×C5 -> CLIP image embeddings ...×embed_dim (not normalised).

        Runs the trunk head (global pool of a 1×1 map, LayerNorm) and the open_clip projection head, i.e.
        what CLIP applies after pooling the whole image, applied to each pooled region instead.
        """
        lead = pooled.shape[:-1]
        x = pooled.reshape(-1, pooled.shape[-1], 1, 1)
        x = self.clip.visual.trunk.head(x)
        x = self.clip.visual.head(x)
        return x.reshape(*lead, x.shape[-1])

    @property
    def tokenizer(self):
        """open_clip's tokenizer for this model (list of strings -> N×context_length token ids)."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> N×embed_dim L2-normalised CLIP text embeddings (frozen text tower, no grad)."""
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self._mean.device)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), TEXT_BATCH):
                tokens = self.tokenizer(list(texts[start:start + TEXT_BATCH])).to(self._mean.device)
                chunks.append(encode_tokens(self.clip, tokens).float())
        return torch.cat(chunks)


def encode_tokens(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text(tokens, normalize=True)`` (N×77 -> N×D), on the context the prompts use.

    CLIP's text tower is causal and pools at the end-of-text token, so the padding after the longest prompt
    changes nothing: cutting the context there gives the same embeddings, several times faster for class prompts
    (~15 of 77 tokens; 4.6× once for ConvNeXt-B, on a busy 2-core CPU). Towers of another kind (no causal
    mask, other pooling) take open_clip's own path.
    """
    pool = getattr(clip, "text_pool_type", None)
    mask = getattr(clip, "attn_mask", None)
    used = tokens.ne(0).any(0).nonzero()
    if pool not in ("argmax", "eos") or mask is None or not hasattr(clip, "token_embedding") or used.numel() == 0:
        return clip.encode_text(tokens, normalize=True)
    length = int(used.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=mask[:length, :length]))
    from open_clip.transformer import text_global_pool

    x = text_global_pool(x, tokens, pool, eos_token_id=getattr(clip, "text_eos_id", None))
    if clip.text_projection is not None:
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
    return F.normalize(x, dim=-1)


def build_backbone(cfg: BackboneConfig) -> FrozenClipBackbone:
    """Build the frozen CLIP backbone named by ``cfg`` (download by tag, local file, or random weights)."""
    clip_model = _create_clip(cfg.clip_model, cfg.pretrained)
    return FrozenClipBackbone(clip_model, cfg.clip_model, cfg.pretrained)
