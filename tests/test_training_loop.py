"""The one loop shape: step counting (also from a resumed step), the LR step, hooks in order, the cadence."""

from __future__ import annotations

from dearli.training.loop import TrainLoop, due


class CountingScheduler:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


def test_due_every_n_and_at_the_last_step():
    assert [s for s in range(1, 11) if due(s, 3, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]  # 0: the last step only


def test_loop_runs_from_a_resumed_step_to_the_end_with_hooks_in_order():
    seen, batches_used = [], []
    scheduler = CountingScheduler()

    def step_fn(batch):
        batches_used.append(batch)
        return {"loss": float(batch)}

    hooks = [lambda s, logged: seen.append(("a", s, logged["loss"])), lambda s, logged: seen.append(("b", s))]
    last = TrainLoop(scheduler, max_steps=5, start_step=2, hooks=hooks).run(iter(range(100)), step_fn)
    assert last == 5 and scheduler.steps == 3 and batches_used == [0, 1, 2]  # stops at max_steps, takes no more
    assert seen == [("a", 3, 0.0), ("b", 3), ("a", 4, 1.0), ("b", 4), ("a", 5, 2.0), ("b", 5)]


def test_a_finished_run_takes_no_batch():
    def step_fn(batch):
        raise AssertionError("no step after max_steps")

    def batches():
        raise AssertionError("no batch asked for")
        yield  # pragma: no cover

    scheduler = CountingScheduler()
    assert TrainLoop(scheduler, max_steps=4, start_step=4).run(batches(), step_fn) == 4 and scheduler.steps == 0
