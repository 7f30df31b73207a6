"""The behaviour of a training loop apart from its math, as reusable hook objects (after detectron2's
``engine/hooks.py``).

A hook (:class:`~dearli.training.loop.Hook`) sees the :class:`~dearli.training.loop.TrainLoop` before
training, after each step (with what the step returned) and after training. The loops differ in what they
write, save and evaluate, so each hook takes that as a function and owns only the *when*:

- :class:`Periodic`: an action every N steps and at the last one (log lines, publishing weights);
- :class:`PeriodicCheckpointer`: a save every N steps and at the last one; remembers what it saved last;
- :class:`EvalHook`: an evaluation every N steps before the last, and the final one after training (also
  when a resumed run had no step left); keeps the final result;
- :class:`EMAHook`: the Mean-Teacher update of the teacher from the student after every step.

Plain PyTorch, no Ray: the Ray Train stages pass actions that report to Ray Train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from dearli.training.ema import ema_update
from dearli.training.loop import Hook, Logged, TrainLoop, due

Action = Callable[[int, Logged], Any]  # (the step just taken, counting from 1; what the step returned)


class Periodic(Hook):
    """``action(step, logged)`` every ``every`` steps and (``at_last``) at the last step; ``every <= 0``: only
    at the last step."""

    def __init__(self, every: int, action: Action, at_last: bool = True):
        self.every = every
        self.action = action
        self.at_last = at_last

    def after_step(self, loop: TrainLoop, logged: Logged) -> None:
        if due(loop.step, self.every, loop.max_steps if self.at_last else -1):
            self.action(loop.step, logged)


class PeriodicCheckpointer(Periodic):
    """``save(step, logged)`` every ``every`` steps and at the last step; ``last`` is what the latest save
    returned (a path), or ``None`` before any."""

    def __init__(self, every: int, save: Action, last: Any = None):
        super().__init__(every, self._save)
        self.save = save
        self.last = last

    def _save(self, step: int, logged: Logged) -> None:
        self.last = self.save(step, logged)


class EvalHook(Hook):
    """``evaluate(step)`` every ``every`` steps before the last (``every <= 0``: never), and after training at
    the step the loop ended on (``final=False``: not then). ``result`` is what the final evaluation returned.

    ``evaluate`` must skip work already done at that step (a resumed run evaluates its last step again)."""

    def __init__(self, every: int, evaluate: Callable[[int], Any], final: bool = True):
        self.every = every
        self.evaluate = evaluate
        self.final = final
        self.result: Any = None

    def after_step(self, loop: TrainLoop, logged: Logged) -> None:
        if self.every > 0 and loop.step % self.every == 0 and loop.step < loop.max_steps:
            self.evaluate(loop.step)

    def after_train(self, loop: TrainLoop) -> None:
        if self.final:
            self.result = self.evaluate(loop.step)


class EMAHook(Hook):
    """After every step: ``teacher ← decay·teacher + (1 − decay)·student`` with ``decay = decay_at(step)``
    (see :func:`dearli.training.ema.ema_update`: the shared frozen backbone is not copied)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, decay_at: Callable[[int], float]):
        self.teacher = teacher
        self.student = student
        self.decay_at = decay_at

    def after_step(self, loop: TrainLoop, logged: Logged) -> None:
        ema_update(self.teacher, self.student, self.decay_at(loop.step))
