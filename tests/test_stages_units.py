"""Parts of the Ray Train stages checked without starting Ray: Train run names on a shared storage, the
weights rank 0 publishes to the teacher pool and a teacher actor loads, and the pseudo-labels a student
worker unpacks from the object store."""

from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dearli.config import load_config
from dearli.data.dataset import load_dataset
from dearli.model.m2f_lang import build_m2f_lang
from dearli.model.predictor import predict_batch
from dearli.stages.ray_train import run_config, train_run_name
from dearli.stages.student import unpack_pseudo_labels
from dearli.stages.teacher import load_published_weights, published_weights
from dearli.training.ema import ema_update, make_teacher

FAST = ["model.inference.test_short_side=64", "model.loss.num_points=256", "data.crop_size=64"]
SYNTH = {"num_images": 2, "seed": 3, "num_val": 1}  # conftest's synth fixture


def test_train_run_names_differ_per_run_dir_and_repeat_for_the_same_one(tmp_path, monkeypatch):
    first, second = tmp_path / "a" / "out", tmp_path / "b" / "out"  # same folder name, one shared storage
    assert train_run_name(first, "ssl") != train_run_name(second, "ssl")
    assert train_run_name(first, "ssl") != train_run_name(first, "warmup")
    name = train_run_name(first, "ssl")
    assert name.startswith("out-ssl-") and len(name) == len("out-ssl-") + 8
    # the same directory however it is spelled (a resumed run passes it again, maybe relative): same name
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert train_run_name("out", "ssl") == name == train_run_name(tmp_path / "b" / ".." / "a" / "out", "ssl")
    cfg = load_config("tiny", ["train.storage_path=" + str(tmp_path / "shared")])
    names = {run_config(cfg, run_dir, "ssl").name for run_dir in (first, second)}
    assert names == {train_run_name(first, "ssl"), train_run_name(second, "ssl")}
    assert run_config(cfg, first, "ssl").storage_path == str(tmp_path / "shared")


def test_a_teacher_actor_reads_the_students_random_backbone(synth):
    """The tiny preset's CLIP is random: a teacher actor that kept its own backbone (another seed, another
    checkpoint) would label with features the student's decoder never saw."""
    cfg = load_config("tiny", [f"data.dataset={synth}", *FAST])
    assert cfg.model.backbone.pretrained == ""
    info = load_dataset(synth)
    torch.manual_seed(0)
    student = build_m2f_lang(cfg.model, info.categories.synonyms)
    teacher = make_teacher(student)
    with torch.no_grad():  # an EMA teacher that moved away from its initialisation
        for param in student.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    ema_update(teacher, student, 0.5)
    torch.manual_seed(1)  # the actor's own model, as a differently seeded process builds it
    replica = build_m2f_lang(cfg.model, info.categories.synonyms).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 255
    with torch.no_grad():
        before = replica(images)["clip_vis_dense"]
        assert (before - teacher(images)["clip_vis_dense"]).abs().max() > 1e-2  # two different backbones

    state = published_weights(teacher, random_backbone=True)
    load_published_weights(replica, state)

    backbone = {k: v for k, v in teacher.state_dict().items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(replica.state_dict()[k], v) for k, v in backbone.items())
    assert all(torch.equal(replica.state_dict()[k], v) for k, v in teacher.state_dict().items())
    assert torch.equal(replica.text.embeddings, teacher.text.embeddings)  # recomputed from the new text tower
    with torch.no_grad():
        ours, theirs = replica(images), teacher(images)
    assert torch.equal(ours["clip_vis_dense"], theirs["clip_vis_dense"])  # the very same features
    for key in ("pred_logits", "pred_masks"):  # the decoders agree up to float summation order (a copy's layout)
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4)
    thing_ids = info.categories.thing_ids
    for mine, reference in zip(predict_batch(replica, images, cfg.model, thing_ids, 0.5),
                               predict_batch(teacher, images, cfg.model, thing_ids, 0.5)):
        assert np.array_equal(mine.panoptic, reference.panoptic)
        assert [(s["id"], s["category_id"]) for s in mine.segments] == [
            (s["id"], s["category_id"]) for s in reference.segments]
        assert [s["score"] for s in mine.segments] == pytest.approx([s["score"] for s in reference.segments])
    # a pretrained backbone is rebuilt from its tag by every actor: only the decoder state travels
    assert not any(k.startswith("backbone.") for k in published_weights(teacher, random_backbone=False))


def test_pseudo_labels_from_the_object_store_become_writable_tensors():
    rng = np.random.default_rng(0)
    result = {"images": rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8),
              "panoptic": rng.integers(0, 3, (2, 8, 8)).astype(np.int32), "valid": rng.random((2, 8, 8)) > 0.2,
              "segments": [[{"id": 1, "category_id": 0, "isthing": False, "score": 0.9}], []]}
    for key in ("images", "panoptic", "valid"):
        result[key].setflags(write=False)  # as Ray hands out arrays: read-only views of the shared memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy of a read-only array warns "not writable"
        images, labels = unpack_pseudo_labels(result)
    assert images.dtype == torch.uint8 and np.array_equal(images.numpy(), result["images"])
    assert [label.segments for label in labels] == result["segments"]
    for label, panoptic, valid in zip(labels, result["panoptic"], result["valid"]):
        assert np.array_equal(label.panoptic.numpy(), panoptic) and np.array_equal(label.valid.numpy(), valid)
    # torch warns only once per process: that the tensors are copies, not views of the read-only memory, is
    # what shows the fix whatever ran before
    shared = [(images, result["images"])] + [(label.panoptic, p) for label, p in zip(labels, result["panoptic"])] + [
        (label.valid, v) for label, v in zip(labels, result["valid"])]
    assert not any(np.shares_memory(tensor.numpy(), array) for tensor, array in shared)


def test_the_teacher_stream_draws_one_permutation_per_epoch_in_the_same_order_as_before(monkeypatch):
    from dearli.stages import teacher as teacher_module

    stems = [f"img_{i:03d}" for i in range(50)]
    seed, rank, world = 3, 1, 2

    def reference(draws: int) -> list[str]:  # the order the feed has always drawn: a fresh permutation per image
        out = []
        share = len(range(rank, len(stems), world))
        for draw in range(draws):
            order = np.random.default_rng((seed, draw // share)).permutation(len(stems))
            out.append([stems[i] for i in order[rank::world]][draw % share])
        return out

    permutations = []
    real_rng = np.random.default_rng
    monkeypatch.setattr(teacher_module.np.random, "default_rng", lambda *a: permutations.append(a) or real_rng(*a))
    feed = teacher_module.PseudoLabelFeed([], stems, per_step=8, rank=rank, world=world, seed=seed, prefetch=0,
                                          max_staleness=1)
    drawn = [r["stem"] for _ in range(10) for r in feed._requests()]  # 80 draws: 25 a rank per epoch, 4 epochs
    monkeypatch.undo()
    assert drawn == reference(80)
    assert len(permutations) == 4, "one permutation of the pool per epoch, not one per image"


class _Teacher:
    """A teacher actor's stand-in: ``label.remote`` answers at once (the tests hand ``ray.get`` the answer back),
    with blank weak views and no segment, labelled by weights of version ``step``."""

    def __init__(self, size: int = 8):
        self.size, self.calls = size, []
        self.label = SimpleNamespace(remote=self._label)

    def _label(self, requests: list[dict], step: int) -> dict:
        self.calls.append(step)
        count, size = len(requests), self.size
        return {"version": step, "node_id": "node", "failed": [], "truth": {}, "requests": requests,
                "stems": [r["stem"] for r in requests], "images": np.zeros((count, 3, size, size), np.uint8),
                "panoptic": np.zeros((count, size, size), np.int32), "valid": np.ones((count, size, size), bool),
                "segments": [[] for _ in requests]}


@pytest.fixture
def instant_ray(monkeypatch):
    from dearli.stages import teacher as teacher_module

    monkeypatch.setattr(teacher_module.ray, "get", lambda ref: ref)


def _feed(teacher: _Teacher, start_step: int = 0, burn_in: int = 5, prefetch: int = 2, per_step: int = 3):
    from dearli.stages.teacher import PseudoLabelFeed

    stems = [f"img_{i:02d}" for i in range(10)]
    return PseudoLabelFeed([teacher], stems, per_step=per_step, rank=0, world=1, seed=4, prefetch=prefetch,
                           max_staleness=10, start_step=start_step, burn_in=burn_in)


def test_the_feed_asks_for_no_label_during_the_burn_in_and_has_the_first_ones_in_flight_after_it(instant_ray):
    teacher = _Teacher()
    feed = _feed(teacher, burn_in=5, prefetch=2)
    assert [feed.next(step) for step in range(1, 5)] == [None] * 4
    assert teacher.calls == [] and feed.draw == 0
    assert feed.next(5) is None  # the last burn-in step sends the first requests ahead
    assert teacher.calls == [5, 5]
    result, stats = feed.next(6)
    assert len(result["stems"]) == 3 and stats.version == 5  # labelled while the burn-in ended
    assert teacher.calls == [5, 5, 6]  # then one request a step, ``prefetch`` of them ahead
    no_burn_in = _Teacher()
    assert _feed(no_burn_in, burn_in=0).next(1)[0]["requests"] == result["requests"]  # the stream starts as before


def test_a_resumed_feed_draws_what_an_uninterrupted_one_draws(instant_ray):
    burn_in, last = 5, 20  # 15 steps of 3 draws: the 10 images' epochs turn over mid-step

    def consumed(start: int) -> dict[int, list[dict]]:
        feed = _feed(_Teacher(), start_step=start, burn_in=burn_in)
        steps = {step: feed.next(step) for step in range(start + 1, last + 1)}
        return {step: fed[0]["requests"] for step, fed in steps.items() if fed is not None}

    whole = consumed(0)
    assert sorted(whole) == list(range(burn_in + 1, last + 1))
    for start in (3, burn_in - 1, burn_in, burn_in + 1, 12):
        assert consumed(start) == {step: whole[step] for step in whole if step > start}, start
        assert _feed(_Teacher(), start_step=start, burn_in=burn_in).draw == 3 * max(0, start - burn_in)


def test_a_burn_in_step_asks_for_no_label_and_makes_no_strong_view(instant_ray, monkeypatch):
    """The student loop: labeled images alone while ``step <= ssl.burn_in_steps``, no request to the teacher
    pool and no strong view; the step after it trains on the labels requested during its last step."""
    from dearli.stages.student import StudentLoop
    from dearli.training import mean_teacher, strong_augment

    cfg = load_config("tiny", ["ssl.burn_in_steps=2", "ssl.prefetch=1"])
    trained, views = [], []
    monkeypatch.setattr(mean_teacher, "mean_teacher_step",
                        lambda *args: trained.append((args[4], args[8])) or {"loss": 1.0, "loss_unsup": 0.0})
    make_view = strong_augment.student_view
    monkeypatch.setattr(strong_augment, "student_view", lambda *args: views.append(1) or make_view(*args))
    loop = StudentLoop.__new__(StudentLoop)  # the state _train_step reads, without Ray Train
    loop.cfg, loop.rank, loop.world, loop.device = cfg, 0, 1, torch.device("cpu")
    loop.loop = SimpleNamespace(step=0)  # the TrainLoop's step counter
    loop.ddp = loop.criterion_u = None
    loop.parts = SimpleNamespace(criterion=None, optimizer=None, scaler=None)
    loop.window, loop.teacher_nodes, loop.teacher_peak_mb, loop.teacher_gpu_peak_mb = {}, set(), 0.0, 0.0
    teacher = _Teacher()
    loop.feed = _feed(teacher, burn_in=2, prefetch=1, per_step=4)
    calls = []
    for step in (1, 2, 3):
        loop._train_step({})
        loop.loop.step = step
        calls.append(list(teacher.calls))
    assert calls == [[], [2], [2, 3]]
    assert trained[0] == (None, 0.0) and trained[1] == (None, 0.0)
    batch, weight = trained[2]
    assert weight == cfg.ssl.unlabeled_weight and len(batch["stems"]) == 4
    assert len(views) == 4  # made at step 3 only
    assert loop.window["staleness"] == [1.0] and loop.teacher_nodes == {"node"}
    assert len(loop.window["loss"]) == 3 and len(loop.window["pl/segments_per_image"]) == 1


def test_a_teacher_without_truth_stats_reads_no_annotation_and_still_labels(synth, monkeypatch):
    from dearli import runtime
    from dearli.config_io import to_dict
    from dearli.stages import teacher as teacher_module

    monkeypatch.setattr(runtime, "quiet", lambda: None)
    store = SimpleNamespace(train_split=SimpleNamespace(remote=lambda: []))  # holds no shared split
    monkeypatch.setattr(teacher_module.ray, "get_actor", lambda name: store)
    monkeypatch.setattr(teacher_module.ray, "get", lambda value: value)
    monkeypatch.setattr(teacher_module.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "n"))
    cfg = load_config("tiny", [f"data.dataset={synth}", *FAST, "ssl.truth_stats=false"])
    worker = teacher_module.TeacherWorker(to_dict(cfg), "store", 0.5)
    worker._refresh = lambda: None  # labels with the weights it was built with
    worker.version = 0
    opened = []
    split_type, load_target = type(worker.split), type(worker.split).load_target
    monkeypatch.setattr(split_type, "load_target", lambda split, record: opened.append(record) or load_target(
        split, record))
    stems = [r.stem for r in worker.split.records]
    requests = [{"stem": stem, "seed": 5 + i} for i, stem in enumerate(stems)]
    result = worker.label(requests, 0)
    assert opened == [] and result["truth"] == {}
    assert result["stems"] == stems and not result["failed"] and result["panoptic"].shape[0] == len(stems)
    # the same images with the statistics on: the annotations are read, the labels and views are the same
    worker.cfg = dataclasses.replace(cfg, ssl=dataclasses.replace(cfg.ssl, truth_stats=True))
    scored = worker.label(requests, 0)
    assert len(opened) == len(stems) and scored["truth"]["images"] == len(stems)
    assert np.array_equal(scored["images"], result["images"]) and np.array_equal(scored["panoptic"],
                                                                                result["panoptic"])


def test_a_worker_takes_the_drivers_train_split_and_does_not_parse_the_json(synth, tmp_path):
    import pickle
    import shutil

    from dearli.errors import DataError
    from dearli.stages.ray_train import worker_dataset

    dataset = shutil.copytree(synth, tmp_path / "ds")
    cfg = load_config("tiny", [f"data.dataset={dataset}"])
    parsed = load_dataset(dataset).split("train")
    shared = pickle.loads(pickle.dumps(parsed))  # as the object store hands it over, stem index rebuilt
    assert list(shared) == list(parsed) and shared.record(parsed.stems[-1]) == parsed.records[-1]
    (dataset / "annotations" / "panoptic_train.json").write_text("{ not json")
    info = worker_dataset(cfg, shared)
    assert info.split("train") is shared and info.categories.names == parsed.categories.names
    with pytest.raises(DataError, match="panoptic_train.json"):  # without the driver's split, the JSON is read
        worker_dataset(cfg).split("train")
