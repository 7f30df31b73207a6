"""An untrained tiny M2F-Lang saved as a checkpoint, as the tests that predict, label, serve or register a
model need one (conftest's ``checkpoint`` fixture builds it for a module).

    from _tiny_model import tiny_checkpoint
    path = tiny_checkpoint(tmp_path / "run", dataset, ["model.inference.test_short_side=64"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dearli.config import load_config
from dearli.data.dataset import load_dataset
from dearli.model.m2f_lang import build_m2f_lang
from dearli.training.checkpoint import save_checkpoint

# Keep every query of a random model (it is never confident) and run the zero-shot ensemble too.
KEEP_EVERY_QUERY = ["model.inference.object_mask_threshold=0.0", "model.inference.overlap_threshold=0.0",
                    "model.inference.test_short_side=64", "model.ensemble.alpha_clip=0.4"]


def tiny_checkpoint(run_dir: str | Path, dataset: str | Path, overrides: Sequence[str] = (), *,
                    record_dataset: bool = False, step: int = 1, seed: int = 0, optimizer: bool = False) -> Path:
    """A random tiny M2F-Lang with ``dataset``'s classes, written by ``save_checkpoint`` under ``run_dir``
    (its random CLIP stored inside, as ``dearli train`` writes it).

    Args:
        overrides: overrides of the tiny preset, recorded in the checkpoint's config.
        record_dataset: put ``data.dataset=<dataset>`` before them, as a stage's config has it.
        step: the checkpoint's step. seed: torch's seed of the weights.
        optimizer: store an AdamW state too, as a stage's checkpoint has it.
    """
    cfg = load_config("tiny", [*([f"data.dataset={dataset}"] if record_dataset else []), *overrides])
    torch.manual_seed(seed)
    model = build_m2f_lang(cfg.model, load_dataset(dataset).categories.synonyms)
    return save_checkpoint(run_dir, step, model, cfg, torch.optim.AdamW(model.parameters()) if optimizer else None)
