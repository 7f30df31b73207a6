"""Torch datasets and batching for training on a panoptic split."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dearli.config import DataConfig
from dearli.training.augment import augment


class PanopticTrainDataset(Dataset):
    """Augmented training samples of the images ``stems`` of a split.

    Crowd segments are left out of the targets (as Mask2Former trains), so their pixels count as
    neither object nor background. Augmentation randomness derives from (seed, epoch, index) so a
    run is reproducible whatever the number of loader workers.
    """

    def __init__(self, split: Any, stems: Sequence[str], cfg: DataConfig, seed: int = 0):
        self.split = split
        self.records = [split.record(stem) for stem in stems]
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = torch.from_numpy(np.array(self.split.load_image(record))).permute(2, 0, 1)
        target = self.split.load_target(record)
        keep = ~np.asarray(target.iscrowd, dtype=bool)
        masks = torch.from_numpy(np.ascontiguousarray(target.masks[keep]))
        labels = torch.as_tensor(np.asarray(target.labels)[keep], dtype=torch.int64)
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
        sample = augment(image, masks, labels, self.cfg, generator)
        return {"image": sample.image, "masks": sample.masks, "labels": sample.labels, "valid": sample.valid,
                "stem": record.stem}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (all crops share one size) and keep per-image targets in a list.

    Returns:
        {"images": B×3×S×S uint8, "valid": B×S×S bool, "targets": [{"masks": N×S×S bool, "labels": N}],
         "stems": [str]}
    """
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "valid": torch.stack([s["valid"] for s in samples]),
        "targets": [{"masks": s["masks"], "labels": s["labels"]} for s in samples],
        "stems": [s["stem"] for s in samples],
    }


def infinite_batches(loader: torch.utils.data.DataLoader, dataset: PanopticTrainDataset):
    """Yield batches forever, reshuffling each epoch."""
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def resumable_batches(rows: Callable[[int], Iterable[Any]], sample: Callable[[int, int, Any], dict[str, Any]],
                      size: int, state: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Collated batches of ``size`` samples, epoch after epoch, from ``state`` = {"epoch", "position"}
    (batches of the epoch already used), which it keeps current for the checkpoints.

    ``rows(epoch)`` gives the epoch's rows in order (called when the epoch starts); ``sample(epoch, index,
    row)`` makes the sample of the ``index``-th row. A resumed epoch skips the rows that earlier steps used.
    The position is counted before a batch is handed out, so a checkpoint taken after its step resumes past it.
    """
    while True:
        epoch, skip, batch = state["epoch"], state["position"] * size, []
        for index, row in enumerate(rows(epoch)):
            if index < skip:
                continue
            batch.append(sample(epoch, index, row))
            if len(batch) == size:
                state["position"] += 1
                yield collate(batch)
                batch = []
        state["epoch"], state["position"] = epoch + 1, 0
