"""One shape for every training loop (supervised, DeWa warm-up, Mean Teacher), after detectron2's engine.

A :class:`TrainLoop` takes batches from an iterator and hands each to the stage's ``step_fn`` (forward,
backward, optimizer step: :func:`dearli.training.step.optimizer_step` underneath), steps the learning-rate
schedule, counts the step and calls the stage's hooks in order. What differs between stages lives in the
batches (labeled images, SAM masks, labeled + pseudo-labelled views) and in the hooks (EMA teacher, logging,
checkpoints, evaluation); the cadence of the periodic ones is :func:`due` everywhere.

Plain PyTorch: the Ray Train stages run the same loop inside their workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Logged = dict[str, float]
StepHook = Callable[[int, Logged], None]  # (the step just taken, counting from 1; what step_fn returned)


def due(step: int, every: int, max_steps: int) -> bool:
    """True every ``every`` steps and at the last step; ``every <= 0`` means at the last step only."""
    return step == max_steps or (every > 0 and step % every == 0)


class TrainLoop:
    """Runs ``step_fn`` on batches until ``max_steps``, from ``start_step`` (a resumed run's)."""

    def __init__(self, scheduler: Any, max_steps: int, start_step: int = 0, hooks: Sequence[StepHook] = ()):
        self.scheduler = scheduler
        self.max_steps = max_steps
        self.step = start_step
        self.hooks = list(hooks)

    def run(self, batches: Iterable[Any], step_fn: Callable[[Any], Logged]) -> int:
        """Train until ``max_steps`` (or the batches end); returns the last step."""
        if self.step >= self.max_steps:
            return self.step
        for batch in batches:
            logged = step_fn(batch)
            self.scheduler.step()
            self.step += 1
            for hook in self.hooks:
                hook(self.step, logged)
            if self.step >= self.max_steps:
                break
        return self.step
