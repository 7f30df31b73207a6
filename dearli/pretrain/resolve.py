"""``model.backbone.pretrained: dearli-synth``: the project's own CLIP as the frozen backbone.

The synthetic world's preset names the small CLIP that ``dearli pretrain-clip`` trains rather than a
file: drivers (the ``dearli`` commands, ``jobs/*.py``, the benches) call :func:`resolve_clip` once, which
puts the checkpoint in the cache on first use (the copy the package ships; trained, about 7 minutes on 2
CPU cores, when the package has none for the current settings) and replaces the name by the cached file's
absolute path. Workers then build the backbone from that path like any open_clip checkpoint.

The cache is content-addressed (see :mod:`dearli.pretrain.checkpoint`): ``$DEARLI_CLIP_CACHE``, else
``clip/`` in the jobs' default workdir (``~/ray_results/dearli/clip``), so the commands and the jobs
train it once between them; a job with another ``--workdir`` keeps it there, which on a cluster is the
shared storage every node reads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from dearli.config import DEFAULT_WORKDIR, Config, load_config
from dearli.config_model import PROJECT_CLIP
from dearli.errors import ConfigError
from dearli.pretrain.checkpoint import cached_path, ensure_pretrained_clip, shipped_checkpoint
from dearli.pretrain.clip import PretrainOptions

CACHE_ENV = "DEARLI_CLIP_CACHE"
CACHE_FOLDER = "clip"  # the cache's folder inside a workdir
LOG_EVERY = 200  # pre-training steps between progress lines


def default_cache_dir() -> Path:
    """``$DEARLI_CLIP_CACHE``, else ``<DEFAULT_WORKDIR>/clip``."""
    return Path(os.environ.get(CACHE_ENV) or Path(DEFAULT_WORKDIR) / CACHE_FOLDER).expanduser().absolute()


def resolve_clip(cfg: Config, cache_dir: str | Path | None = None, log: Callable[[str], None] = print,
                 train: bool = True) -> Config:
    """``cfg`` with ``model.backbone.pretrained`` = the project CLIP's checkpoint path if it names PROJECT_CLIP.

    The checkpoint is trained first when the cache does not hold it (``train=False``: only the path, for
    dry runs). Any other ``pretrained`` value is returned unchanged.
    """
    backbone = cfg.model.backbone
    if backbone.pretrained != PROJECT_CLIP:
        return cfg
    options = PretrainOptions()
    if backbone.clip_model != options.model:
        raise ConfigError(f"model.backbone.clip_model: {PROJECT_CLIP!r} weights exist for {options.model!r} "
                          f"only, not {backbone.clip_model!r}")
    root = Path(cache_dir).expanduser().absolute() if cache_dir else default_cache_dir()
    path = cached_path(root, options)
    if train and not path.exists():
        path = pretrain_project_clip(root, log)
    backbone = dataclasses.replace(backbone, pretrained=str(path))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone))


def pretrain_project_clip(cache_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Train the project's CLIP into ``cache_dir`` unless it is there; returns its checkpoint path."""
    options = PretrainOptions()
    root = Path(cache_dir).expanduser().absolute()
    path = cached_path(root, options)
    if path.exists():
        return path
    if shipped_checkpoint(options) is not None:
        log(f"[clip] the project's CLIP comes with the package; cached as {path} ('dearli pretrain-clip --out "
            f"FILE' trains it again: {options.steps} steps, about 7 minutes on 2 CPU cores)")
        return ensure_pretrained_clip(root, options=options)
    log(f"[clip] pre-training the project's CLIP once ({options.steps} steps); cached as {path}")

    def progress(step: int, metrics: dict) -> None:
        if step % LOG_EVERY == 0 or step == options.steps:
            log(f"[clip] step {step}/{options.steps}: loss {metrics['loss']:.3f}, {metrics['seconds']:.0f} s")

    return ensure_pretrained_clip(root, options=options, log=progress)


def is_project_clip(pretrained: str, cache_dir: str | Path) -> bool:
    """Whether ``pretrained`` is the project CLIP's checkpoint path in ``cache_dir`` (trained or not yet)."""
    return bool(pretrained) and Path(pretrained) == cached_path(Path(cache_dir).expanduser().absolute(),
                                                                PretrainOptions())


def load_resolved_config(preset: str, overrides: list[str] | tuple[str, ...] = (),
                         cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Config:
    """:func:`dearli.config.load_config` followed by :func:`resolve_clip`."""
    return resolve_clip(load_config(preset, list(overrides)), cache_dir, log)
