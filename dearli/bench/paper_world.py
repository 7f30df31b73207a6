"""Inputs of a paper-scale run that need no download: a small tree in the ADE20K layout and random weights of
the real models saved as the checkpoint files users keep.

The ADE20K tree is what ``dearli data prepare-ade20k`` reads (``images``, ``annotations`` and
``annotations_instance``, each with ``training`` and ``validation``): rooms of wall, sky and floor with a bed and
a person as instances. ``dearli bench gpu`` runs the pipeline on it, and the paper-scale test does the same on
the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# SceneParsing labels (1-based) and the instance-challenge classes of the scenes.
WALL, SKY, FLOOR, BED, PERSON = 1, 3, 4, 8, 13
INST_BED, INST_PERSON = 1, 4
COLOURS = {WALL: (200, 190, 170), SKY: (120, 170, 230), FLOOR: (110, 80, 60), BED: (230, 230, 240),
           PERSON: (200, 120, 90)}
SPLIT_FOLDERS = (("train", "training"), ("val", "validation"))
DEFAULT_CLIP = "convnext_base_w_320"  # the backbone of the paper presets


def ade_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image H×W×3 uint8, semantic H×W uint8, instance H×W×3 uint8) of a room: wall, sky, floor, a bed, a person."""
    sem = np.full((height, width), WALL, np.uint8)
    sem[: height // 4, width // 2:] = SKY
    sem[height // 2:] = FLOOR
    ins = np.zeros((height, width, 3), np.uint8)
    for index, (label, inst) in enumerate(((BED, INST_BED), (PERSON, INST_PERSON)), start=1):
        h, w = int(rng.integers(height // 5, height // 3)), int(rng.integers(width // 6, width // 4))
        y, x = int(rng.integers(height // 3, height - h)), int(rng.integers(0, width - w))
        sem[y:y + h, x:x + w] = label
        ins[y:y + h, x:x + w] = (inst, index, 0)
    image = np.zeros((height, width, 3), np.uint8)
    for label, colour in COLOURS.items():
        image[sem == label] = colour
    noise = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), sem, ins


def write_ade20k_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """An ``ADEChallengeData2016`` tree at ``root`` with ``counts["train"]`` and ``counts["val"]`` rooms of
    ``size`` (H, W); stems ``ADE_<split>_<8 digits>`` from 1. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, folder in SPLIT_FOLDERS:
        for sub in ("images", "annotations", "annotations_instance"):
            (root / sub / folder).mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            stem = f"ADE_{split}_{i + 1:08d}"
            image, sem, ins = ade_scene(rng, *size)
            Image.fromarray(image).save(root / "images" / folder / f"{stem}.jpg", quality=95)
            Image.fromarray(sem, mode="L").save(root / "annotations" / folder / f"{stem}.png")
            Image.fromarray(ins, mode="RGB").save(root / "annotations_instance" / folder / f"{stem}.png")
    return root


def write_ade20k_partition(folder: Path, name: str, stems: list[str]) -> Path:
    """``folder/partitions/<name>/labeled.txt`` listing training ``stems`` as the standard partition files do
    (``image annotation`` per line); ``prepare-ade20k --partitions folder/partitions`` takes it."""
    path = folder / "partitions" / name / "labeled.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"images/training/{s}.jpg annotations/training/{s}.png\n" for s in stems))
    return folder / "partitions"


def save_random_weights(folder: Path, seed: int = 0, sam_type: str = "vit_b",
                        clip_model: str = DEFAULT_CLIP) -> dict[str, str]:
    """Random weights of SAM ``sam_type`` and OpenCLIP ``clip_model`` saved as state dicts in ``folder``, the way
    users keep downloaded checkpoints: {"sam": path, "clip": path}."""
    import open_clip
    import torch
    from segment_anything import sam_model_registry

    folder.mkdir(parents=True, exist_ok=True)
    files = {"sam": folder / f"sam_{sam_type}_random.pth", "clip": folder / f"{clip_model}_random.pt"}
    torch.manual_seed(seed)
    torch.save(sam_model_registry[sam_type]().state_dict(), files["sam"])
    torch.save(open_clip.create_model(clip_model).state_dict(), files["clip"])
    return {k: str(v) for k, v in files.items()}
