"""One trainer skeleton for every training loop (supervised, DeWa warm-up, Mean Teacher, CLIP pre-training),
after detectron2's ``engine/train_loop.py``.

A :class:`TrainLoop` takes batches from an iterator and hands each to the loop's ``step_fn`` (forward,
backward, optimizer step), steps the learning-rate schedule, counts the step and calls its hooks
(:mod:`dearli.training.hooks`: logging, checkpoints, evaluation, the EMA teacher) before training, after each
step and after training. What differs between loops lives in the batches (labeled images, SAM masks, labeled
+ pseudo-labelled views, image-caption pairs), in ``step_fn`` and in the hooks' actions; the cadence of the
periodic ones is :func:`due` everywhere.

Plain PyTorch: the Ray Train stages run the same loop inside their workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Logged = dict[str, float]


def due(step: int, every: int, max_steps: int) -> bool:
    """True every ``every`` steps and at the last step; ``every <= 0`` means at the last step only."""
    return step == max_steps or (every > 0 and step % every == 0)


class Hook:
    """What a loop calls before training, after each step and after training; does nothing by itself (the
    reusable hooks are in :mod:`dearli.training.hooks`)."""

    def before_train(self, loop: TrainLoop) -> None:
        pass

    def after_step(self, loop: TrainLoop, logged: Logged) -> None:
        pass

    def after_train(self, loop: TrainLoop) -> None:
        pass


class TrainLoop:
    """Runs ``step_fn`` on batches until ``max_steps``, from ``start_step`` (a resumed run's).

    ``step`` is the number of steps taken so far (the step just taken, inside ``after_step``).
    """

    def __init__(self, scheduler: Any, max_steps: int, start_step: int = 0, hooks: Sequence[Hook] = ()):
        self.scheduler = scheduler
        self.max_steps = max_steps
        self.step = start_step
        self.hooks = list(hooks)

    def run(self, batches: Iterable[Any], step_fn: Callable[[Any], Logged]) -> int:
        """Train until ``max_steps`` (or the batches end); returns the last step.

        ``after_train`` runs also when a resumed run had no step left, so a final evaluation that a crash
        cut off still happens; it does not run when a step raised.
        """
        for hook in self.hooks:
            hook.before_train(self)
        if self.step < self.max_steps:
            for batch in batches:
                logged = step_fn(batch)
                self.scheduler.step()
                self.step += 1
                for hook in self.hooks:
                    hook.after_step(self, logged)
                if self.step >= self.max_steps:
                    break
        for hook in self.hooks:
            hook.after_train(self)
        return self.step


class FunctionSchedule:
    """A learning-rate schedule given as a function: every group's lr is ``lr_at(step)`` before step ``step``
    (counting from 0); the loop calls :meth:`step` after each optimizer step."""

    def __init__(self, optimizer: Any, lr_at: Callable[[int], float], start_step: int = 0):
        self.optimizer = optimizer
        self.lr_at = lr_at
        self.last_step = start_step
        self._apply()

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.last_step)
