"""The synthetic worlds results are chosen on and reported on, named in one place.

A recipe choice (a preset's steps, ``ssl.*`` switches, the ensemble's α) is made on the development worlds:
the main job's world (its validation split) and the two held-out worlds below. The **test world** is
reserved for reporting: no choice reads it, and ``dearli bench test-world`` is the one command that scores
checkpoints on it. A choice made by looking at its numbers would make it one more development world; a new
seed would then be needed for reporting.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorldSpec:
    """One synthetic world: ``dearli synth --seed SEED --num-images TRAIN --val-images VAL`` (default image size);
    results are read on its validation split."""

    name: str
    seed: int
    train: int
    val: int
    role: str

    def folder_name(self) -> str:
        return f"synth_seed{self.seed}_{self.train}_{self.val}"


MAIN = WorldSpec("main", 0, 400, 100, "development: the main job's world; choices read its validation split")
HELD_OUT = WorldSpec("held-out", 1, 4, 100, "development: the α sweep, the partition study, the ssl switches")
RECIPE = WorldSpec("recipe", 2, 4, 600, "development: the steps, any_thing and things-first choices")
TEST = WorldSpec("test", 9, 16, 400, "reporting only: scored by 'dearli bench test-world', read by no choice")
WORLDS = (MAIN, HELD_OUT, RECIPE, TEST)
