"""``dearli data``: prepare standard datasets and check dataset directories."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from dearli.errors import DataError

_DATASET_HELP = "dataset directory holding dataset.yaml (or a standard COCO panoptic layout)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="prepare ADE20K / COCO-Objects and check dataset directories",
        description="Dataset tools. Each prepare command writes COCO panoptic JSON + PNGs, semantic PNGs and "
                    "a dataset.yaml that 'dearli train' and 'dearli evaluate' read. Existing outputs are "
                    "never replaced unless --overwrite is given.")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])

    ade = sub.add_parser(
        "prepare-ade20k", help="convert ADEChallengeData2016 (+ annotations_instance) to COCO panoptic",
        description="Convert ADE20K to COCO panoptic with 150 categories (ids 0-149; 100 things, 50 stuff), "
                    "following Mask2Former's preparation: stuff from the semantic annotation, then the thing "
                    "instances of the 2017 instance annotations (annotations_instance/, download "
                    "annotations_instance.tar from the SceneParsing site and unpack it inside ROOT); thing "
                    "pixels without an instance stay VOID.")
    ade.add_argument("root", metavar="ROOT", help="the ADEChallengeData2016 directory")
    _add_prepare_options(ade, "ROOT itself (files named ade20k_panoptic_{train,val}*)")
    ade.set_defaults(handler=_prepare_ade20k)

    coco = sub.add_parser(
        "prepare-coco-objects", help="convert COCO panoptic (133 classes) to COCO-Objects (81 classes)",
        description="Convert COCO panoptic to COCO-Objects: the 80 thing classes stay instances, every stuff "
                    "and VOID pixel becomes one 'background' segment (category id 0) per image. ROOT is a "
                    "COCO directory (annotations/panoptic_{train,val}2017.json, panoptic_{train,val}2017/, "
                    "{train,val}2017/) or any dataset directory with a dataset.yaml. Images are not copied.")
    coco.add_argument("root", metavar="ROOT", help="COCO panoptic dataset directory")
    _add_prepare_options(coco, "ROOT/coco_objects")
    coco.set_defaults(handler=_prepare_coco_objects)

    check = sub.add_parser(
        "check", help="validate every image and annotation of a dataset",
        description="Read every image, panoptic PNG and semantic PNG of a split and check them against the "
                    "panoptic JSON (readable, not truncated, sizes agree, segment ids agree, known category "
                    "ids). Prints one line per bad item (file: reason) and a summary; exits 1 if any.")
    check.add_argument("dataset", metavar="DATASET_DIR", help=_DATASET_HELP)
    check.add_argument("--split", metavar="S", help="check only this split (default: every split; "
                                                    "'train' when --partition is given)")
    check.add_argument("--partition", metavar="P", help="check the partition file P and only the images it "
                                                        "lists, e.g. 1_8")
    check.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    check.set_defaults(handler=_check)


def _add_prepare_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", metavar="DIR", help=f"output directory (default: {default_out})")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    parser.add_argument("--partitions", metavar="DIR",
                        help="directory of partitions (<name>/labeled.txt) to reference from dataset.yaml")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def _prepare_ade20k(args: argparse.Namespace) -> int:
    from dearli.data.prepare_ade20k import prepare_ade20k

    out = prepare_ade20k(args.root, args.out, overwrite=args.overwrite, partitions=args.partitions,
                         workers=args.workers, progress=not args.no_progress)
    print(f"wrote {out / 'dataset.yaml'}")
    return 0


def _prepare_coco_objects(args: argparse.Namespace) -> int:
    from dearli.data.prepare_coco_objects import prepare_coco_objects

    out = prepare_coco_objects(args.root, args.out, overwrite=args.overwrite, partitions=args.partitions,
                               workers=args.workers, progress=not args.no_progress)
    print(f"wrote {out / 'dataset.yaml'}")
    return 0


def check_split(info, split_name: str, partition: str | None = None,
                progress: bool = False) -> tuple[int, list[DataError], int]:
    """Check one split (optionally restricted to a partition's labeled images).

    An image of the train split without a panoptic annotation belongs to the unlabeled pool (COCO's
    unlabeled2017, say): its image is read and counted, not reported. Everywhere else (val, a partition's
    labeled list) a missing annotation is a problem.

    Returns (images checked, every problem found, images without annotation); never raises for per-item
    problems.
    """
    problems: list[DataError] = []
    split = info.split(split_name, problems=problems)
    if partition is not None:
        try:
            part = info.partition(partition)
        except DataError as err:
            return 0, problems + [err], 0
        for line, stem in part.missing(split):
            problems.append(DataError(part.path, f"line {line}: image '{stem}' is not in split '{split_name}'"))
        split = split.subset([s for s in part.labeled if split.has(s)])
    unlabeled_pool = partition is None and split_name == "train"
    checked, unannotated = 0, 0
    for error in _check_records(split, progress, unlabeled_pool):
        if error is None:
            checked += 1
        elif error is UNANNOTATED:
            unannotated += 1
        else:
            problems.append(error)
    return checked, problems, unannotated


UNANNOTATED = object()  # what _check_records yields, after None, for an image of the unlabeled pool


def _check_records(split, progress: bool, unlabeled_pool: bool = False) -> Iterator[object]:
    """Yields a DataError per problem, and None after each image (then UNANNOTATED when it is an image of the
    unlabeled pool, whose missing annotation is no problem)."""
    from tqdm import tqdm

    num_classes = split.categories.num_classes
    for rec in tqdm(split.records, desc=f"check {split.name}", unit="img", disable=not progress):
        pool = unlabeled_pool and rec.panoptic_path is None
        for load in (split.load_image,) if pool else (split.load_image, split.load_target):
            try:
                load(rec)
            except DataError as err:
                yield err
        if rec.semantic_path is not None:
            try:
                values = set(split.load_semantic(rec).ravel().tolist())
                bad = sorted(v for v in values if v >= num_classes and v != 255)
                if bad:
                    yield DataError(rec.semantic_path, f"values {bad} are neither training ids "
                                                      f"(< {num_classes}) nor 255")
            except DataError as err:
                yield err
        yield None
        if pool:
            yield UNANNOTATED


def _check(args: argparse.Namespace) -> int:
    from dearli.data.dataset import load_dataset

    info = load_dataset(args.dataset)
    names = [args.split] if args.split else (["train"] if args.partition else info.split_names)
    total_checked, total_bad = 0, 0
    for name in names:
        checked, problems, unannotated = check_split(info, name, args.partition, progress=not args.no_progress)
        for err in problems:
            print(f"BAD {err}")
        pool = f", {unannotated} without annotation (the unlabeled pool)" if unannotated else ""
        print(f"split '{name}': {checked} images checked{pool}, {len(problems)} problem(s)")
        total_checked += checked
        total_bad += len(problems)
    print(f"{total_checked} images checked, {total_bad} problem(s) in total")
    return 1 if total_bad else 0
