"""Configuration: frozen dataclasses, built from YAML presets, overridden from the command line.

A run's configuration is ``Config``. It is built from the defaults below, then a preset shipped in
``dearli/configs/<name>.yaml`` (or any YAML file; ``extends: <preset or file>`` merges it over another
one), then ``key.sub=value`` overrides, and validated on
the way: an unknown key, a value of the wrong type or an impossible value raises :class:`ConfigError`
naming the dotted key. ``save_config`` writes the resolved configuration beside every run.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dearli.config_io import flatten_params, from_dict, merge, parse_override, read_yaml, require, to_dict
from dearli.config_model import ModelConfig
from dearli.errors import ConfigError

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # a configuration override on a command line: key.sub=value
# COCO's training short sides (DEARLi/Mask2Former: int(0.1·k·512) for k = 5..20).
COCO_SHORT_SIDES = (256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024)
PRECISIONS = ("fp32", "amp")
THING_PSEUDO_CLASSES = ("teacher", "any_thing")  # ssl.thing_pseudo_classes
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies


# Where the jobs put datasets, caches, runs and the local MLflow store unless told otherwise (--workdir);
# an absolute, stable place, as Ray users expect of ~/ray_results.
DEFAULT_WORKDIR = "~/ray_results/dearli"
@dataclass(frozen=True)
class DataConfig:
    dataset: str = ""  # dataset directory holding dataset.yaml; "" = the synthetic world under the run dir
    partition: str = ""  # partition name under the dataset's partition dir, e.g. "1_8"; "" = all labeled
    train_split: str = "train"  # split the partition selects from
    val_split: str = "val"  # split used for evaluation
    # Training resize as detectron2's ResizeShortestEdge("choice"): the short side is drawn uniformly from
    # short_sides, then the long side is capped at max_size. Defaults are COCO's (int(0.1·k·512), k = 5..20).
    crop_size: int = 512  # square training crop (images smaller than it are padded)
    short_sides: tuple[int, ...] = COCO_SHORT_SIDES  # candidate short sides of the training resize
    max_size: int = 2048  # cap on the long side after the training resize
    flip: bool = True  # random horizontal flip
    color_aug: bool = True  # SSD photometric distortion of labeled and warm-up images (upstream COLOR_AUG_SSD)
    hue_delta: int = 18  # SSD hue shift bound in OpenCV units of 2 degrees (18 = ±36°); 0 keeps hues
    num_workers: int = 0  # DataLoader worker processes

    def validate(self) -> None:
        require(self.crop_size % 32 == 0, "data.crop_size", f"must be a multiple of 32, got {self.crop_size}")
        require(len(self.short_sides) > 0 and min(self.short_sides) > 0, "data.short_sides",
                 f"must be a non-empty list of positive sizes, got {list(self.short_sides)}")
        require(self.max_size >= max(self.short_sides), "data.max_size",
                 f"must be >= the largest of data.short_sides ({max(self.short_sides)}), got {self.max_size}")
        require(0 <= self.hue_delta <= 90, "data.hue_delta", f"must lie in [0, 90], got {self.hue_delta}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay (none on norms and embeddings)
    poly_power: float = 0.9  # poly learning-rate schedule exponent
    clip_grad: float = 0.01  # full-model gradient-norm clip; 0 disables
    betas: tuple[float, float] = (0.9, 0.999)

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", "must be positive")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 20000  # optimizer steps of the main stage (Mean Teacher) and of `dearli train`
    batch_size: int = 16  # images per step (across all workers) of the supervised-only loop (`dearli train`)
    # `dearli train` on a named partition runs this many steps instead of max_steps (the paper's supervised
    # baselines: 10k at the smallest partition plus 10k for each larger one). {} = always max_steps.
    supervised_steps: dict[str, int] = field(default_factory=dict)
    seed: int = 0  # seeds data order, augmentation and initialisation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision where a GPU exists (ignored on CPU); Mean Teacher: ssl.precision
    log_every: int = 20  # steps between log lines
    checkpoint_every: int = 1000  # steps between checkpoints
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    # Ray Train stages (warm-up, Mean Teacher); the single-process supervised loop ignores these.
    num_workers: int = 1  # Train workers (DDP ranks); train.batch_size is split across them
    use_gpu: str = "auto"  # auto (GPU workers when the cluster has GPUs) | yes | no
    cpus_per_worker: float = 1.0  # logical CPUs each Train worker reserves
    # torch intra-op threads of each Train worker; 0 = one per logical CPU it reserves (Ray's OMP_NUM_THREADS).
    # Where dearli starts a local Ray it counts more logical CPUs than cores, so a worker then gets 1 thread.
    threads_per_worker: int = 0
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per worker
    # How the workers' placement group uses the nodes: PACK (fewest nodes, the fastest DDP) | SPREAD (over the
    # nodes, best effort: a restart after a lost node still fits on the others) | STRICT_PACK | STRICT_SPREAD.
    placement_strategy: str = "PACK"
    max_failures: int = 3  # worker failures a stage survives (restart from its last checkpoint)
    keep_checkpoints: int = 2  # Ray Train checkpoints kept per stage (the newest ones)
    storage_path: str = ""  # Ray Train storage (path or pyarrow URI); "" = <run dir>/ray

    def validate(self) -> None:
        require(self.max_steps > 0, "train.max_steps", "must be positive")
        require(self.num_workers > 0, "train.num_workers", "must be positive")
        require(self.use_gpu in ("auto", "yes", "no"), "train.use_gpu",
                 f"must be auto, yes or no, got {self.use_gpu!r}")
        require(self.keep_checkpoints > 0, "train.keep_checkpoints", "must be positive")
        require(self.threads_per_worker >= 0, "train.threads_per_worker", "must be >= 0")
        require(self.placement_strategy in PLACEMENT_STRATEGIES, "train.placement_strategy",
                 f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}")
        require(self.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 = unlimited)")
        require(self.batch_size > 0, "train.batch_size", "must be positive")
        for name, steps in self.supervised_steps.items():
            require(steps > 0, f"train.supervised_steps.{name}", f"must be positive, got {steps}")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 "train.device", f"must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass(frozen=True)
class WarmupConfig:
    """DeWa: class-agnostic decoder warm-up on the SAM masks of every training image."""

    max_steps: int = 80000  # optimizer steps (paper: 80k on ADE20K, 160k on COCO)
    batch_size: int = 16  # images per step across all workers (paper: 16)
    max_masks: int = 100  # SAM masks kept per image as targets, largest first (overlaps allowed)
    min_mask_area: int = 16  # SAM masks smaller than this (pixels, after augmentation) are dropped

    def validate(self) -> None:
        require(self.max_steps > 0, "warmup.max_steps", "must be positive")
        require(self.batch_size > 0, "warmup.batch_size", "must be positive")
        require(self.max_masks > 0, "warmup.max_masks", "must be positive")


@dataclass(frozen=True)
class StrongViewConfig:
    """The photometric part of the student's strong view of an unlabeled image; the defaults are upstream
    DEARLi's (UniMatch's): ColorJitter(0.8, 0.8, 0.8, 0.2) always, grayscale p 0.2, blur σ 0.1-2 px p 0.5."""

    brightness: float = 0.8  # factor drawn from [max(0, 1 - b), 1 + b]
    contrast: float = 0.8  # factor drawn from [max(0, 1 - c), 1 + c]
    saturation: float = 0.8  # factor drawn from [max(0, 1 - s), 1 + s]
    hue: float = 0.2  # shift drawn from [-h, h] (fraction of the hue circle)
    grayscale_prob: float = 0.2  # probability of dropping colour altogether
    blur_prob: float = 0.5  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # its σ in pixels, drawn uniformly from this range

    def validate(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            require(getattr(self, name) >= 0, f"ssl.strong_view.{name}", "must be >= 0")
        require(0.0 <= self.hue <= 0.5, "ssl.strong_view.hue", f"must lie in [0, 0.5], got {self.hue}")
        for name in ("grayscale_prob", "blur_prob"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"ssl.strong_view.{name}", f"must lie in [0, 1], got {value}")
        low, high = self.blur_sigma
        require(0.0 < low <= high, "ssl.strong_view.blur_sigma",
                 f"must be [low, high] with 0 < low <= high, got {list(self.blur_sigma)}")


@dataclass(frozen=True)
class SSLConfig:
    """Mean Teacher: student on labeled + strongly perturbed unlabeled images, EMA teacher as a Ray actor pool."""

    labeled_batch_size: int = 8  # labeled images per step across all workers (paper: 8)
    unlabeled_batch_size: int = 8  # unlabeled images per step across all workers (paper: 8)
    unlabeled_weight: float = 1.0  # weight of the loss on pseudo-labels (paper: 1)
    ema_decay: float = 0.999  # teacher = EMA of the student (parameters and buffers)
    # Steps at the start that train the student on the labeled images alone, with the teacher copied from it
    # after each and no pseudo-label asked for: the EMA then starts from a student that knows the classes
    # instead of labelling with the warm-up's class-agnostic decoder. 0 = none, as in DEARLi's configs. Not
    # upstream's BURN_IN_ITERS, which keeps its teacher fixed and still trains the student on that one's labels.
    burn_in_steps: int = 0
    cutmix_prob: float = 0.5  # probability that an unlabeled pair is mixed by CutMix
    strong_view: StrongViewConfig = field(default_factory=StrongViewConfig)  # the student's photometric view
    # DIAGNOSTIC, never for a real run: the student's unlabeled branch trains on the ground truth of the
    # unlabeled images (in the weak view's geometry) instead of the teacher's labels. It measures the ceiling of
    # what the semi-supervised branch can learn; the run says so loudly in its log and in MLflow.
    oracle_labels: bool = False
    # Score the teacher's labels against the ground truth of the unlabeled images where they have one (the log's
    # gt/segments_per_image, pl/thing_recall, pl/thing_precision): the teacher actors then read those
    # annotations. On for the synthetic world; off for real data, whose unlabeled images stand for unannotated ones.
    truth_stats: bool = False
    teacher_actors: int = 1  # actors in the teacher pool
    teacher_gpus: float = -1.0  # GPUs per teacher actor; -1 = 1 when the cluster has GPUs, else 0
    teacher_cpus: float = 1.0  # logical CPUs per teacher actor
    teacher_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per teacher actor
    publish_every: int = 5  # student steps between publications of the EMA weights to the teacher pool
    prefetch: int = 2  # pseudo-label requests each Train worker keeps in flight (hides the teacher's latency)
    max_staleness: int = 10  # pseudo-labels made by weights older than this many steps are never used
    min_confidence: float = 0.0  # pseudo-label segments whose class probability is lower are left unlabeled
    # The same floor for thing segments alone; -1 = min_confidence, above 1 = the student gets no thing
    # pseudo-label at all (stuff only). For a teacher whose things are mostly wrong.
    thing_min_confidence: float = -1.0
    # The teacher's pixel hand-out (evaluation keeps Mask2Former's): things first where a thing query's mask is
    # >= 0.5, so a stuff mask spread over a small thing does not label it stuff; and stuff pixels only where
    # the stuff mask reaches ssl.pseudo_stuff_min_mask (the rest unlabeled). Off/0.5 = upstream.
    pseudo_things_first: bool = False
    pseudo_stuff_min_mask: float = 0.5
    # CE weight of "no object" for the queries no pseudo-label segment matched; -1 = model.loss.no_object_weight
    # (as upstream). A teacher that misses objects leaves them unlabeled, not absent: a lower weight keeps
    # the student from learning that what the teacher missed is nothing.
    unlabeled_no_object_weight: float = -1.0
    # What a thing pseudo-label teaches the student's classifier: "teacher" = the teacher's class (upstream);
    # "any_thing" = only that it is a thing (the loss and the matching take the mass on every thing class),
    # for a teacher that finds things but names them badly; the mask losses and stuff labels are unchanged.
    thing_pseudo_classes: str = "teacher"
    # CLIP weight of the teacher's ensemble when it labels; -1 = the model's (model.ensemble and its schedule),
    # as upstream. Evaluation always uses model.ensemble.
    teacher_alpha_clip: float = -1.0
    # Student and teacher arithmetic: fp32 | amp (bf16/fp16 autocast on GPUs). Upstream trains this stage in
    # fp32 (a plain trainer, unlike its AMP warm-up and supervised runs): pseudo-labels come from softmaxes of
    # cosine logits ×100, where bf16 rounding (~2⁻⁸ per cosine, ~0.4 logit) flips close class decisions.
    precision: str = "fp32"

    def thing_floor(self) -> float | None:
        """The confidence floor of thing pseudo-labels, None when it is ``min_confidence``."""
        return None if self.thing_min_confidence == -1.0 else self.thing_min_confidence

    def validate(self) -> None:
        for name in ("labeled_batch_size", "unlabeled_batch_size", "teacher_actors", "publish_every"):
            require(getattr(self, name) > 0, f"ssl.{name}", "must be positive")
        require(self.precision in PRECISIONS, "ssl.precision",
                 f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        require(0.0 <= self.ema_decay < 1.0, "ssl.ema_decay", "must lie in [0, 1)")
        require(0.0 <= self.cutmix_prob <= 1.0, "ssl.cutmix_prob", "must lie in [0, 1]")
        require(self.unlabeled_weight >= 0, "ssl.unlabeled_weight", "must be >= 0")
        require(self.prefetch >= 0, "ssl.prefetch", "must be >= 0")
        require(self.burn_in_steps >= 0, "ssl.burn_in_steps", "must be >= 0")
        require(self.unlabeled_no_object_weight == -1.0 or self.unlabeled_no_object_weight >= 0,
                 "ssl.unlabeled_no_object_weight", "must be -1 (model.loss.no_object_weight) or >= 0, "
                 f"got {self.unlabeled_no_object_weight}")
        require(0.5 <= self.pseudo_stuff_min_mask <= 1.0, "ssl.pseudo_stuff_min_mask",
                 f"must lie in [0.5, 1], got {self.pseudo_stuff_min_mask}")
        require(self.thing_min_confidence == -1.0 or self.thing_min_confidence >= 0, "ssl.thing_min_confidence",
                 f"must be -1 (ssl.min_confidence) or >= 0, got {self.thing_min_confidence}")
        require(self.thing_pseudo_classes in THING_PSEUDO_CLASSES, "ssl.thing_pseudo_classes",
                 f"must be one of {', '.join(THING_PSEUDO_CLASSES)}, got {self.thing_pseudo_classes!r}")
        require(self.teacher_alpha_clip == -1.0 or 0.0 <= self.teacher_alpha_clip <= 1.0, "ssl.teacher_alpha_clip",
                 f"must be -1 (the model's ensemble) or lie in [0, 1], got {self.teacher_alpha_clip}")
        # Labels requested ``prefetch`` steps ahead with weights up to ``publish_every`` steps old: a smaller
        # bound would make the feed relabel nearly every batch (correct, but the student would wait for it).
        require(self.max_staleness >= self.publish_every + self.prefetch, "ssl.max_staleness",
                 f"must be >= ssl.publish_every + ssl.prefetch ({self.publish_every + self.prefetch})")


@dataclass(frozen=True)
class CacheConfig:
    sam_cache: str = ""  # URI (path or s3://...) of a SAM mask cache from `dearli cache sam`; "" = none
    clip_cache: str = ""  # URI of a CLIP feature cache from `dearli cache clip`; "" = none
    sam_type: str = "vit_h"  # segment_anything model: vit_b | vit_l | vit_h (tiny: random, tests only)
    sam_checkpoint: str = ""  # local path of the SAM weights
    points_per_side: int = 32  # SAM automatic-mask-generator point grid
    points_per_batch: int = 256  # prompts per SAM decoder call (memory only, same output)
    pred_iou_thresh: float = 0.88  # drop masks whose predicted IoU is lower
    stability_score_thresh: float = 0.95  # drop masks whose stability score is lower
    images_per_part: int = 8  # images per committed Parquet part (work lost on a crash is < one part)

    def validate(self) -> None:
        require(self.points_per_side > 0, "cache.points_per_side", "must be positive")
        require(self.points_per_batch > 0, "cache.points_per_batch", "must be positive")
        require(self.images_per_part > 0, "cache.images_per_part", "must be positive")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


def load_config(preset: str = "tiny", overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- preset (shipped name or YAML path, after the presets it extends) <- ``key=value``
    overrides, validated."""
    values = read_yaml(preset)
    for text in overrides:
        values = merge(values, parse_override(text))
    return from_dict(Config, values)


def supervised_config(cfg: Config) -> Config:
    """``cfg`` for the supervised-only loop: ``train.max_steps`` from ``train.supervised_steps`` when that
    table lists ``data.partition`` (the paper's baseline schedule), else unchanged."""
    steps = cfg.train.supervised_steps.get(cfg.data.partition)
    if steps is None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved configuration as YAML (refuses to overwrite a different existing one).

    A file saved by an older dearli, without the fields added since, is the same configuration when those
    fields take their defaults here (:func:`config_differences`): it is left as it is, so a run continues
    across an upgrade.
    """
    path = Path(path)
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if path.exists() and path.read_text() != text:
        differ = config_differences(config, path)
        if differ:
            raise ConfigError(f"{path}: a different configuration is already saved here ({', '.join(differ[:5])}); "
                              "use a new run dir")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_differences(config: Config, path: str | Path) -> list[str]:
    """The keys (``ssl.ema_decay``) whose values differ between ``config`` and the configuration saved in
    ``path``, read with today's defaults: a field added since the file was written counts as its default.
    The one rule for "same configuration" (saving a run's config, continuing a run). A file that no longer
    reads differs as a whole: ["<path> (no longer a valid configuration)"]."""
    saved = _saved_config(Path(path))
    if saved is None:
        return [f"{path} (no longer a valid configuration)"]
    before, now = flatten_params(to_dict(saved)), flatten_params(to_dict(config))
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def _saved_config(path: Path) -> Config | None:
    """The configuration saved in ``path``, read with today's defaults; None if it no longer reads."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
        return from_dict(Config, values) if isinstance(values, dict) else None
    except (ConfigError, yaml.YAMLError):
        return None
