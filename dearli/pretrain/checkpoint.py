"""Pretrained-CLIP checkpoints: the file format and the content-addressed cache.

A checkpoint is ``{"state_dict": open_clip state dict, "dearli_pretrain": {...}}``; open_clip's loader
takes the ``state_dict`` entry, so the file works wherever an open_clip checkpoint path does. The
``dearli_pretrain`` entry records the options, the content key and the versions that made it.

The cache names a file by a hash of everything that determines its weights (the pre-training options,
the open_clip model config, the class table and the versions of the world generator and the pair
stream): the same request returns the same file and trains at most once, also across processes (a lock
file serialises concurrent requests). Files are written to a temporary name and linked into place, so a
reader never sees half a checkpoint and an existing file is never replaced.

The package ships the checkpoint of the default options (``weights/``, trained by ``dearli pretrain-clip``
with them): a cache that lacks it gets a copy instead of minutes of training. Any other options, or a
change to what the key covers, train as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dearli.data.synth.classes import CLASSES
from dearli.data.synth.writer import GENERATOR_VERSION
from dearli.errors import DataError, OutputError
from dearli.pretrain.clip import PretrainOptions, train_clip
from dearli.pretrain.pairs import PAIRS_VERSION

TRAINER_VERSION = 1  # bump when a change to the training loop changes the weights for the same options
META_KEY = "dearli_pretrain"
KEY_CHARS = 16  # hex digits of the content hash in a cached file's name


def content_key(options: PretrainOptions) -> str:
    """Hex digest of everything that determines the weights trained with ``options``."""
    import open_clip

    from dearli.model.backbone import register_dearli_clip_configs

    register_dearli_clip_configs()
    blob = {
        "options": options.as_dict(),
        "model_config": open_clip.get_model_config(options.model),
        "classes": [[c.names, c.isthing, c.kind, c.rgb, c.weight] for c in CLASSES],
        "versions": {"world": GENERATOR_VERSION, "pairs": PAIRS_VERSION, "trainer": TRAINER_VERSION},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=list).encode()).hexdigest()


def cached_path(cache_root: str | Path, options: PretrainOptions) -> Path:
    """Where the cache keeps the checkpoint of ``options``: ``<root>/<model>-<hash>.pt``."""
    return Path(cache_root) / f"{options.model}-{content_key(options)[:KEY_CHARS]}.pt"


def read_metadata(path: str | Path) -> dict:
    """The ``dearli_pretrain`` entry of a checkpoint ({} for a plain open_clip checkpoint)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise DataError(path, f"not a readable checkpoint ({err})") from err
    return dict(checkpoint.get(META_KEY, {})) if isinstance(checkpoint, dict) else {}


def write_checkpoint(model: nn.Module, options: PretrainOptions, path: str | Path) -> Path:
    """Save ``model`` to ``path`` atomically; an existing ``path`` is never replaced (DataError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"options": options.as_dict(), "key": content_key(options), "model": options.model,
            "versions": {"world": GENERATOR_VERSION, "pairs": PAIRS_VERSION, "trainer": TRAINER_VERSION}}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"state_dict": state, META_KEY: meta}, handle)
        try:
            os.link(tmp, path)  # atomic and fails if path exists: never replaces another file
        except FileExistsError:
            raise DataError(path, "exists already; choose a new file name") from None
    finally:
        os.unlink(tmp)
    return path


SHIPPED_DIR = Path(__file__).parent / "weights"  # checkpoints that come with the package


def shipped_checkpoint(options: PretrainOptions) -> Path | None:
    """The package's checkpoint of ``options``, or None when it ships none for them."""
    path = SHIPPED_DIR / cached_path(".", options).name
    return path if path.is_file() else None


def _install(source: Path, path: Path) -> None:
    """Copy ``source`` to ``path`` through a temporary file and a link (never replaces a file)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle, open(source, "rb") as src:
                shutil.copyfileobj(src, handle)
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    except OSError as err:
        raise OutputError(path, f"cannot copy the shipped CLIP here ({err.strerror or err}); free space or set "
                          "DEARLI_CLIP_CACHE to a writable folder") from err


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock on ``path`` (created if missing) for the duration of the block."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_pretrained_clip(cache_root: str | Path, steps: int | None = None, seed: int | None = None,
                           options: PretrainOptions | None = None, log=None) -> Path:
    """Path of the pretrained CLIP for ``options`` (``steps`` / ``seed`` override its fields), training it
    first if the cache does not hold it yet (copied from the package instead when it ships that checkpoint).

    The returned file loads with ``model.backbone.pretrained=<path>``. A file at the cached name whose
    recorded key differs (a corrupt or foreign file) is an error, never overwritten.
    """
    options = options or PretrainOptions()
    changes = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    options = PretrainOptions(**{**{f: getattr(options, f) for f in options.__dataclass_fields__}, **changes})
    options.validate()
    path = cached_path(cache_root, options)
    with _locked(path.with_name(path.name + ".lock")):
        shipped = shipped_checkpoint(options)
        if not path.exists() and shipped is not None:
            _install(shipped, path)
        elif not path.exists():
            write_checkpoint(train_clip(options, log=log), options, path)
    if read_metadata(path).get("key") != content_key(options):
        raise DataError(path, "holds a checkpoint of other pre-training settings; remove it or use another cache")
    return path
