"""The Mean-Teacher teacher as a Ray actor pool that streams panoptic pseudo-labels to the student.

Three parts:

* :class:`WeightsStore`, one actor per run: rank 0 of the student publishes the EMA weights (decoder only,
  the frozen backbone never changes; a random backbone travels with them, see :func:`published_weights`)
  every ``ssl.publish_every`` steps with a version = its step. The store re-puts them itself, so it owns
  the object and a lost Train worker does not take the weights with it.
* :class:`TeacherWorker` actors (``ssl.teacher_actors``, each with ``ssl.teacher_gpus``/``teacher_cpus`` and
  ``ssl.teacher_resources``): load the newest weights at every call, take weak views of unlabeled images
  (the geometry the student's strong view keeps), run backbone + decoder + zero-shot CLIP branch + geometric
  ensemble (α from the schedule) + panoptic inference, and return the views with their pseudo-labels.
  Actors restart on failure (also on another node) and calls to a lost actor are retried.
* :class:`PseudoLabelFeed`, inside each Train worker: keeps ``ssl.prefetch`` requests in flight and hands
  the student one batch per step after the burn-in (``ssl.burn_in_steps``: no request before its last
  step, which sends the first ``ssl.prefetch`` ones so the step after it does not wait). Staleness
  (student step minus the weights version that made the labels) is bounded by construction: a batch older
  than ``ssl.max_staleness`` is labelled again with the newest weights before use, so no step ever trains
  on staler labels. Time spent blocked is measured.
"""

from __future__ import annotations

import collections
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from dearli.config import Config
from dearli.config_io import from_dict, to_dict
from dearli.device import resolve_device
from dearli.errors import DataError
from dearli.stages.costs import peak_gpu_mb, peak_rss_mb


@ray.remote(num_cpus=0)
class WeightsStore:
    """Newest published teacher weights: (version, [ObjectRef]) — the ref travels in a list so it is not
    resolved on the way. It also hands the teachers the driver's parsed train split (the same way)."""

    def __init__(self) -> None:
        self.version = -1
        self.ref = None
        self.split_refs: list = []

    def share_split(self, refs: list) -> None:
        # A method, not a constructor argument: Ray warns that an actor restarted from constructor arguments
        # in the object store may fail to read them back.
        self.split_refs = refs

    def train_split(self) -> list:
        return self.split_refs

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> int:
        if version > self.version:
            self.version, self.ref = int(version), ray.put(state)
        return self.version

    def latest(self) -> tuple[int, list | None]:
        return self.version, None if self.ref is None else [self.ref]


class TeacherWorker:
    """One teacher model; ``label(requests, step)`` -> weak views + pseudo-labels (see :meth:`label`)."""

    def __init__(self, cfg_dict: dict[str, Any], store_name: str, labeled_fraction: float):
        from dearli.model.m2f_lang import build_m2f_lang
        from dearli.runtime import quiet
        from dearli.stages.ray_train import worker_dataset

        quiet()
        self.cfg: Config = from_dict(Config, cfg_dict)
        # By name, not by handle: a handle argument lives in the object store, and an actor restarted after
        # its node died could not read it back.
        self.store = ray.get_actor(store_name)
        self.labeled_fraction = labeled_fraction
        self.device = resolve_device()  # the actor's own GPU when it was given one
        # The driver's parse when the store holds it (start_teacher_pool), else this actor's (a restarted store).
        shared = ray.get(self.store.train_split.remote())
        info = worker_dataset(self.cfg, shared[0] if shared else None)
        self.split = info.split(self.cfg.data.train_split)
        self.thing_ids = self.split.categories.thing_ids
        # A random (tiny) backbone built here is replaced by the student's at the first load (see
        # published_weights); the seed keeps the actor's start reproducible.
        torch.manual_seed(self.cfg.train.seed)
        self.model = build_m2f_lang(self.cfg.model, info.categories.synonyms).to(self.device).eval()
        self.version = -1
        self.node_id = ray.get_runtime_context().get_node_id()

    def _refresh(self, timeout_s: float = 600.0) -> None:
        """Load the newest published weights; before the first publication, wait for it."""
        deadline = time.monotonic() + timeout_s
        while True:
            version, refs = ray.get(self.store.latest.remote())
            if version > self.version:
                load_published_weights(self.model, ray.get(refs[0]))
                self.version = version
            if self.version >= 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("no teacher weights were published")
            time.sleep(0.05)

    @torch.no_grad()
    def label(self, requests: list[dict[str, Any]], step: int) -> dict[str, Any]:
        """Pseudo-label the weak views of ``requests`` ({stem, seed}) with the newest weights.

        With ``ssl.oracle_labels`` (a diagnostic) the labels are the ground truth of the same views instead.

        Returns:
            {"images": B×3×S×S uint8, "valid": B×S×S bool, "panoptic": B×S×S int32, "segments": B lists of
             {id, category_id, isthing, score}, "stems", "version", "node_id", "seconds", "peak_rss_mb" (of
             this actor's process),
             "truth": the teacher's labels against the ground truth of the same views (sums over the batch,
             see :func:`truth_stats`; {} when the images have no annotation or ``ssl.truth_stats`` is off),
             "failed": [(stem, path, reason)] for unreadable images (left out of the batch)}
        """
        from dearli.model.ensemble import alpha_schedule
        from dearli.model.inference import PanopticRule
        from dearli.model.predictor import predict_batch
        from dearli.training.pseudo_labels import from_prediction

        started = time.perf_counter()
        self._refresh()
        views, valids, truths, stems, failed = [], [], [], [], []
        for request in requests:
            record = self.split.record(request["stem"])
            try:
                view, valid, truth = self._weak_view(record, int(request["seed"]))
            except DataError as err:
                failed.append((request["stem"], str(err.path or record.image_path), err.problem))
                continue
            views.append(view)
            valids.append(valid)
            truths.append(truth)
            stems.append(request["stem"])
        out: dict[str, Any] = {"version": self.version, "node_id": self.node_id, "failed": failed, "truth": {},
                               "stems": stems, "images": None, "valid": None, "panoptic": [], "segments": []}
        if views:
            images = torch.stack(views).to(self.device)
            alpha = self.cfg.ssl.teacher_alpha_clip
            if alpha < 0:  # the model's own ensemble, as upstream's teacher
                alpha = alpha_schedule(self.cfg.model.ensemble, max(self.version, 0), self.cfg.train.max_steps,
                                       self.labeled_fraction)
            rule = PanopticRule(self.cfg.ssl.pseudo_things_first, self.cfg.ssl.pseudo_stuff_min_mask)
            predictions = predict_batch(self.model, images, self.cfg.model, self.thing_ids, alpha, rule)
            labels = [from_prediction(p, v) for p, v in zip(predictions, valids)]
            if all(t is not None for t in truths):
                if self.cfg.ssl.truth_stats:
                    out["truth"] = truth_stats(labels, truths)
                if self.cfg.ssl.oracle_labels:
                    labels = truths
            out["images"] = images.to(torch.uint8).cpu().numpy()
            out["valid"] = torch.stack(valids).numpy()
            out["panoptic"] = np.stack([label.panoptic.numpy() for label in labels])
            out["segments"] = [label.segments for label in labels]
        out["seconds"] = time.perf_counter() - started
        out["peak_rss_mb"] = peak_rss_mb()
        out.update(peak_gpu_mb())
        return out

    def _weak_view(self, record: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(weak view 3×S×S uint8, valid S×S bool, the ground truth of the view as a PseudoLabel or None when
        the image has no annotation or none is read, see :meth:`_truth`); DataError when the image (or, for the
        oracle, its annotation) is bad."""
        from dearli.training.pseudo_labels import truth_view, weak_view

        image = torch.from_numpy(np.ascontiguousarray(self.split.load_image(record))).permute(2, 0, 1)
        target = self._truth(record)
        generator = torch.Generator().manual_seed(seed)
        if target is None:
            view, valid, _ = weak_view(image, self.cfg.data, generator)
            return view, valid, None
        # The same seed draws the same geometry as weak_view (the masks do not change the draws).
        keep = ~np.asarray(target.iscrowd, dtype=bool)
        return truth_view(image, torch.from_numpy(np.ascontiguousarray(target.masks[keep])),
                          torch.as_tensor(target.labels[keep], dtype=torch.int64), self.thing_ids,
                          self.cfg.data, generator)

    def _truth(self, record: Any) -> Any:
        """The image's panoptic ground truth, or None when it has none (or, outside the oracle, a bad one: the
        truth only feeds statistics then, and a bad annotation costs them, not the image). Neither the oracle
        nor ``ssl.truth_stats`` asks for it: None, and no annotation is read."""
        oracle = self.cfg.ssl.oracle_labels
        if not oracle and not self.cfg.ssl.truth_stats:
            return None
        if record.panoptic_path is None:
            if oracle:
                raise DataError(record.image_path, "ssl.oracle_labels needs the ground truth of every unlabeled "
                                                   "image, and this one has no panoptic annotation")
            return None
        try:
            return self.split.load_target(record)
        except DataError:
            if oracle:
                raise
            return None


def truth_stats(labels: list[Any], truths: list[Any]) -> dict[str, float]:
    """Sums over a batch of (pseudo-label, ground truth of the same view): thing segments matched (same class,
    IoU > 0.5), thing and all segments in each; the student turns them into rates for its log."""
    from dearli.training.pseudo_labels import thing_agreement

    sums = {"matched_things": 0.0, "pl_things": 0.0, "gt_things": 0.0, "gt_segments": 0.0, "images": 0.0}
    for label, truth in zip(labels, truths):
        matched, predicted, true = thing_agreement(label, truth)
        sums["matched_things"] += matched
        sums["pl_things"] += predicted
        sums["gt_things"] += true
        sums["gt_segments"] += len(truth.segments)
        sums["images"] += 1
    return sums


def published_weights(teacher: torch.nn.Module, random_backbone: bool) -> dict[str, torch.Tensor]:
    """What rank 0 publishes to the pool: the EMA teacher's state without the frozen backbone (detached CPU
    copies), plus the backbone when it is a random one (``model.backbone.pretrained: ""``).

    A random backbone cannot be rebuilt from a tag: the teachers get the student's, so they read the same
    features whatever checkpoint or seed it came from.
    """
    from dearli.training.ema import trainable_state

    state = trainable_state(teacher)
    if random_backbone:
        state.update({k: v.detach().cpu() for k, v in teacher.state_dict().items() if k.startswith("backbone.")})
    return state


def load_published_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`published_weights` state into a teacher actor's ``model``."""
    if any(k.startswith("backbone.") for k in state):
        model.load_state_dict(state, strict=False)  # a random backbone: M2FLang recomputes the text embeddings
    else:
        # No backbone in the state: the text embeddings (from the frozen text tower) stay valid, and plain
        # Module loading skips M2FLang's recomputation of them.
        torch.nn.Module.load_state_dict(model, state, strict=False)


def start_teacher_pool(cfg: Config, labeled_fraction: float, gpus: float,
                       train_split: Any = None) -> tuple[Any, list[Any]]:
    """The weights store and ``ssl.teacher_actors`` teacher actors (restarted and retried on failure) with
    ``gpus`` GPUs each (``ray_train.ssl_gpus``); ``train_split``: the driver's shared split
    (``ray_train.share_train_split``), else each actor parses the JSON."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The store lives with the driver (as Ray Train's controller does): a restarted store would be empty, and
    # every teacher would wait for the next publication while the student waits for pseudo-labels.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    store_name = f"dearli-teacher-weights-{uuid.uuid4().hex[:8]}"
    store = WeightsStore.options(name=store_name, max_restarts=-1, max_task_retries=-1,
                                 scheduling_strategy=here).remote()
    if train_split is not None:
        ray.get(store.share_split.remote([train_split]))  # before any teacher asks for it
    actor_cls = ray.remote(TeacherWorker)
    # SPREAD: interchangeable actors over as many nodes as offer their resources, so a lost node takes few.
    options: dict[str, Any] = {"num_cpus": cfg.ssl.teacher_cpus, "num_gpus": gpus, "max_restarts": -1,
                               "max_task_retries": -1, "scheduling_strategy": "SPREAD"}
    if cfg.ssl.teacher_resources:
        options["resources"] = dict(cfg.ssl.teacher_resources)
    cfg_dict = to_dict(cfg)
    teachers = [actor_cls.options(**options).remote(cfg_dict, store_name, labeled_fraction)
                for _ in range(cfg.ssl.teacher_actors)]
    return store, teachers


def stop_teacher_pool(store: Any, teachers: list[Any]) -> None:
    for actor in [*teachers, store]:
        if actor is not None:
            ray.kill(actor)


@dataclass
class FeedStats:
    """What one :meth:`PseudoLabelFeed.next` cost: staleness of the labels and seconds spent waiting."""

    staleness: int
    wait_s: float
    relabelled: int
    version: int
    node_id: str


class PseudoLabelFeed:
    """The student side: a stream of pseudo-labelled weak views, ``prefetch`` requests ahead.

    Each rank draws its own share of the unlabeled images (a per-epoch permutation, ranks interleaved), so
    ranks never label the same image in the same epoch. The first ``burn_in`` steps take no batch: the
    stream starts at step ``burn_in + 1``, and a worker resumed after ``start_step`` steps draws the images
    an uninterrupted one would.
    """

    def __init__(self, teachers: list[Any], stems: list[str], per_step: int, rank: int, world: int,
                 seed: int, prefetch: int, max_staleness: int, start_step: int = 0, burn_in: int = 0):
        self.teachers, self.stems, self.per_step = teachers, list(stems), per_step
        self.rank, self.world, self.seed = rank, world, seed
        self.prefetch, self.max_staleness, self.burn_in = prefetch, max_staleness, burn_in
        self.skip: set[str] = set()
        self.failed: list[tuple[str, str, str]] = []
        self.queue: collections.deque = collections.deque()
        self.calls = rank  # spreads the ranks' requests over the actors
        # Position in this rank's endless sequence of images: every step after the burn-in took one batch.
        self.draw = max(0, start_step - burn_in) * per_step
        self._order: tuple[int, list[str]] = (-1, [])  # (epoch, this rank's images in that epoch's order)

    def _requests(self) -> list[dict[str, Any]]:
        out = []
        while len(out) < self.per_step:
            share = self._share()
            stem = self._epoch_order(self.draw // share)[self.draw % share]
            if stem not in self.skip:
                out.append({"stem": stem, "seed": (self.seed * 1_000_003 + self.rank * 7919 + self.draw) % 2**31})
            self.draw += 1
            if len(self.skip) >= len(self.stems):
                raise DataError(None, "every unlabeled image failed to load; see the run's errors table")
        return out

    def _share(self) -> int:
        """Images per epoch for this rank (every image when there are fewer images than ranks)."""
        return len(range(self.rank, len(self.stems), self.world)) or len(self.stems)

    def _epoch_order(self, epoch: int) -> list[str]:
        """This rank's images of ``epoch`` in their order: one permutation of the pool per epoch, kept."""
        if self._order[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.stems))
            mine = [self.stems[i] for i in order[self.rank::self.world]]
            self._order = (epoch, mine or [self.stems[i] for i in order])
        return self._order[1]

    def _submit(self, step: int, requests: list[dict[str, Any]] | None = None) -> None:
        requests = requests if requests is not None else self._requests()
        teacher = self.teachers[self.calls % len(self.teachers)]
        self.calls += 1
        self.queue.append((requests, teacher.label.remote(requests, step)))

    def next(self, step: int) -> tuple[dict[str, Any], FeedStats] | None:
        """The pseudo-labelled batch for student step ``step`` (labels at most ``max_staleness`` old); None
        during the burn-in (``step <= burn_in``), whose last step sends the first ``prefetch`` requests."""
        if step <= self.burn_in:
            while step == self.burn_in and len(self.queue) < self.prefetch:
                self._submit(step)
            return None
        started = time.perf_counter()
        relabelled = 0
        while True:
            while len(self.queue) < self.prefetch + 1:
                self._submit(step)
            requests, ref = self.queue.popleft()
            result = ray.get(ref)
            while step - result["version"] > self.max_staleness:
                relabelled += 1  # too old: label the same views again with the newest weights
                result = ray.get(self.teachers[self.calls % len(self.teachers)].label.remote(requests, step))
            self._record_failures(result["failed"])
            if result["stems"]:
                break
        while len(self.queue) < self.prefetch:
            self._submit(step)
        stats = FeedStats(step - result["version"], time.perf_counter() - started, relabelled,
                          result["version"], result["node_id"])
        return result, stats

    def _record_failures(self, failed: list[tuple[str, str, str]]) -> None:
        for stem, path, reason in failed:
            if stem not in self.skip:
                self.skip.add(stem)
                self.failed.append((stem, path, reason))

    def close(self) -> None:
        for _, ref in self.queue:
            ray.cancel(ref)
        self.queue.clear()
