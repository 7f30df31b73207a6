"""The one loop shape and its hooks: step counting (also from a resumed step), the LR step, hooks in order,
the cadence, the final evaluation, the EMA update, the function schedule and resumable batches."""

from __future__ import annotations

import torch

from dearli.training.data import resumable_batches
from dearli.training.hooks import EMAHook, EvalHook, Periodic, PeriodicCheckpointer
from dearli.training.loop import FunctionSchedule, Hook, TrainLoop, due


class CountingScheduler:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


class Recorder(Hook):
    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def before_train(self, loop):
        self.seen.append((self.name, "before", loop.step))

    def after_step(self, loop, logged):
        self.seen.append((self.name, loop.step, logged["loss"]))

    def after_train(self, loop):
        self.seen.append((self.name, "after", loop.step))


def test_due_every_n_and_at_the_last_step():
    assert [s for s in range(1, 11) if due(s, 3, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]  # 0: the last step only


def test_loop_runs_from_a_resumed_step_to_the_end_with_hooks_in_order():
    seen, batches_used = [], []
    scheduler = CountingScheduler()

    def step_fn(batch):
        batches_used.append(batch)
        return {"loss": float(batch)}

    hooks = [Recorder("a", seen), Recorder("b", seen)]
    last = TrainLoop(scheduler, max_steps=5, start_step=2, hooks=hooks).run(iter(range(100)), step_fn)
    assert last == 5 and scheduler.steps == 3 and batches_used == [0, 1, 2]  # stops at max_steps, takes no more
    assert seen == [("a", "before", 2), ("b", "before", 2), ("a", 3, 0.0), ("b", 3, 0.0), ("a", 4, 1.0),
                    ("b", 4, 1.0), ("a", 5, 2.0), ("b", 5, 2.0), ("a", "after", 5), ("b", "after", 5)]


def test_a_finished_run_takes_no_batch_but_still_ends_its_hooks():
    def step_fn(batch):
        raise AssertionError("no step after max_steps")

    def batches():
        raise AssertionError("no batch asked for")
        yield  # pragma: no cover

    scheduler, seen = CountingScheduler(), []
    evaluated = []
    hooks = [Recorder("a", seen), EvalHook(2, lambda step: evaluated.append(step) or {"pq": 1.0})]
    assert TrainLoop(scheduler, max_steps=4, start_step=4, hooks=hooks).run(batches(), step_fn) == 4
    assert scheduler.steps == 0 and seen == [("a", "before", 4), ("a", "after", 4)]
    assert evaluated == [4] and hooks[1].result == {"pq": 1.0}  # the final evaluation a crash may have cut off


def test_a_failed_step_skips_after_train():
    seen = []

    def step_fn(batch):
        raise RuntimeError("boom")

    try:
        TrainLoop(CountingScheduler(), 3, hooks=[Recorder("a", seen)]).run(iter(range(5)), step_fn)
    except RuntimeError:
        pass
    assert seen == [("a", "before", 0)]


def test_periodic_hooks_checkpoints_and_evaluation_keep_their_cadence():
    logged, saved, evaluated, published = [], [], [], []
    checkpointer = PeriodicCheckpointer(3, lambda step, out: saved.append(step) or f"ckpt{step}", last="old")
    evaluation = EvalHook(2, lambda step: evaluated.append(step) or step)
    hooks = [Periodic(4, lambda step, out: logged.append((step, out["loss"]))), checkpointer, evaluation,
             Periodic(2, lambda step, out: published.append(step), at_last=False)]
    assert checkpointer.last == "old"
    TrainLoop(CountingScheduler(), 7, hooks=hooks).run(iter(range(100)), lambda b: {"loss": float(b)})
    assert logged == [(4, 3.0), (7, 6.0)] and saved == [3, 6, 7] and checkpointer.last == "ckpt7"
    assert evaluated == [2, 4, 6, 7] and evaluation.result == 7  # periodic before the last step, then final
    assert published == [2, 4, 6]  # at_last=False: not at step 7
    no_eval = EvalHook(0, lambda step: evaluated.append(-step), final=False)
    TrainLoop(CountingScheduler(), 2, hooks=[no_eval]).run(iter(range(9)), lambda b: {"loss": 0.0})
    assert evaluated == [2, 4, 6, 7] and no_eval.result is None


def test_ema_hook_moves_the_teacher_by_the_decay_of_each_step():
    student, teacher = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
    decays = []

    def decay_at(step):
        decays.append(step)
        return 0.5

    TrainLoop(CountingScheduler(), 2, hooks=[EMAHook(teacher, student, decay_at)]).run(
        iter(range(9)), lambda b: {"loss": 0.0})
    assert decays == [1, 2] and torch.allclose(teacher.weight, torch.full((1, 2), 0.75))


def test_function_schedule_sets_the_lr_of_each_step_before_it():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    seen = []

    def step_fn(batch):
        seen.append(optimizer.param_groups[0]["lr"])
        return {"loss": 0.0}

    TrainLoop(FunctionSchedule(optimizer, lambda step: 0.1 * (step + 1)), 3).run(iter(range(9)), step_fn)
    assert seen == [0.1, 0.2, 0.1 * 3]


def test_resumable_batches_resume_mid_epoch_where_an_uninterrupted_run_is():
    def rows(epoch):
        return [10 * epoch + i for i in range(5)]  # 5 rows: 2 batches of 2 per epoch, the last row dropped

    def sample(epoch, index, row):
        return {"image": torch.zeros(1, 1, 1, dtype=torch.uint8), "valid": torch.ones(1, 1, dtype=torch.bool),
                "masks": torch.zeros(0, 1, 1, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.int64),
                "stem": f"{epoch}:{index}:{row}"}

    state = {"epoch": 0, "position": 0}
    stream = resumable_batches(rows, sample, 2, state)
    whole = [next(stream)["stems"] for _ in range(5)]
    assert whole == [["0:0:0", "0:1:1"], ["0:2:2", "0:3:3"], ["1:0:10", "1:1:11"], ["1:2:12", "1:3:13"],
                     ["2:0:20", "2:1:21"]]
    assert state == {"epoch": 2, "position": 1}
    resumed_state = {"epoch": 1, "position": 1}  # what a checkpoint after the 3rd batch holds
    resumed = resumable_batches(rows, sample, 2, resumed_state)
    assert [next(resumed)["stems"] for _ in range(2)] == whole[3:]
