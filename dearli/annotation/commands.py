"""``dearli export label-studio`` and ``dearli import label-studio``: pseudo-labels out to Label Studio as
pre-annotated tasks, and the corrected annotations back into a dataset as a partition to train on."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

TASKS_FILE = "tasks.json"
CONFIG_FILE = "label_config.xml"
TOKEN_ENV = "LABEL_STUDIO_API_KEY"
LOCAL_FILES = "/data/local-files/?d="  # Label Studio serving local files (see --document-root)
SHOWN_PROBLEMS = 20  # problems printed; all of them are in the import's unusable.csv


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_export(subparsers)
    _register_import(subparsers)


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write pseudo-labels as tasks of an annotation tool",
                                   description="Write labels for an annotation tool. Formats: label-studio.")
    sub = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])
    ls = sub.add_parser(
        "label-studio", help="pseudo-labels as pre-annotated Label Studio tasks",
        description="Write OUT/tasks.json, one Label Studio task per image of a 'dearli pseudo-label' output with "
        "its segments as a prediction (one region per segment, labelled with its class and carrying its class "
        "score), and OUT/label_config.xml, the labeling interface with every class. Brush regions hold the "
        "exact masks; --polygons writes the outer boundary of each part of a segment instead (holes are "
        "filled). Each task's image is PREFIX + the image's path below --document-root.",
        epilog="example: dearli export label-studio runs/pseudo --out runs/label-studio",
    )
    ls.add_argument("labels", metavar="LABELS", help="output folder of 'dearli pseudo-label'")
    ls.add_argument("--out", required=True, metavar="DIR", help="folder for tasks.json and label_config.xml")
    ls.add_argument("--polygons", action="store_true", help="polygon regions instead of brush masks")
    ls.add_argument("--image-root", default=LOCAL_FILES, metavar="PREFIX",
                    help="start of every image URL (default: /data/local-files/?d=, Label Studio serving local "
                    "files; or e.g. https://host/images/)")
    ls.add_argument("--document-root", default=None, metavar="DIR",
                    help="image URLs hold the path below this folder (default: the parent of the folder holding "
                    "the images; give Label Studio the same as LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
    ls.add_argument("--model-version", default=None, metavar="V",
                    help="model_version of the predictions (default: dearli-<checkpoint digest>)")
    ls.add_argument("--overwrite", action="store_true", help="replace OUT's tasks.json and label_config.xml")
    push = ls.add_argument_group("send the tasks to a running Label Studio as well (optional)")
    push.add_argument("--url", default=None, help="Label Studio's address, e.g. http://localhost:8080")
    push.add_argument("--token", default=None, help=f"API token (default: ${TOKEN_ENV})")
    target = push.add_mutually_exclusive_group()
    target.add_argument("--project", type=int, default=None, metavar="ID", help="the project to add the tasks to")
    target.add_argument("--create-project", default=None, metavar="TITLE",
                        help="create a project with the labeling interface (and, for local-files image URLs, a "
                        "Local files storage on the images' folder) and add the tasks to it")
    ls.set_defaults(handler=_export)


def _register_import(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="read corrected annotations back into a dataset",
                                   description="Read annotations of an annotation tool into a dataset. Formats: "
                                   "label-studio.")
    sub = parser.add_subparsers(dest="import_format", metavar="FORMAT")
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])
    ls = sub.add_parser(
        "label-studio", help="Label Studio's JSON export into a dataset split and a new partition",
        description="Take the latest annotation (not cancelled) of every task of a Label Studio JSON export, "
        "turn its brush and polygon regions into a COCO panoptic annotation (a later region wins where regions "
        "overlap; the regions of one stuff class make one segment) and add it to the dataset's train split, "
        "replacing an earlier annotation of that image (kept in the import's record folder, "
        "DATASET/label_studio_imports/). Then write partition NAME: the --base-partition's images plus the "
        "imported ones, for 'dearli train --partition NAME'. Regions that cannot be used (unknown class, "
        "empty mask, image not in the dataset, another image size, undecodable RLE, ...) are printed and "
        "listed in the record's unusable.csv. No existing file is overwritten; the split's JSON is replaced "
        "whole, after every new PNG is in place.",
        epilog="example: dearli import label-studio project-1-export.json --dataset runs/synth --partition "
        "1_8_corrected --base-partition 1_8",
    )
    ls.add_argument("export", metavar="EXPORT", help="the project's export in Label Studio's JSON format")
    ls.add_argument("--dataset", required=True, help="dataset directory (with dataset.yaml)")
    ls.add_argument("--partition", required=True, metavar="NAME", help="the partition to write")
    ls.add_argument("--base-partition", default=None, metavar="P",
                    help="a partition whose labeled images NAME lists as well (default: none, only the imported)")
    ls.add_argument("--split", default="train", help="the split the images belong to (default: train)")
    ls.add_argument("--overwrite", action="store_true", help="replace an existing partition NAME")
    ls.set_defaults(handler=_import)


def _push_settings(args: argparse.Namespace) -> tuple[str, str]:
    """(url, token) of the push options, given with --project or --create-project (ConfigError otherwise)."""
    from dearli.errors import ConfigError

    token = args.token or os.environ.get(TOKEN_ENV)
    if not (args.url and (args.project is not None or args.create_project) and token):
        raise ConfigError(f"sending the tasks needs --url, --project ID or --create-project TITLE, and --token "
                          f"(or ${TOKEN_ENV}) together")
    return args.url, token


def _push(args: argparse.Namespace, tasks: list[dict[str, Any]], label_config: str, folder: str | None) -> None:
    """Send the tasks to the project at --url (or a new one, --create-project), in chunks, skipping the images
    the project holds already. A new project gets a Local files storage on ``folder`` where it is not None."""
    from dearli.errors import DearliError
    from dearli.predict.label_studio_api import Client

    url, token = _push_settings(args)
    client = Client(url, token)
    project = args.project
    if project is None:
        project = client.create_project(args.create_project, label_config, model_version=tasks[0]["predictions"][0]
                                        .get("model_version"))
        print(f"Label Studio: created project {project} '{args.create_project}': {url.rstrip('/')}/projects/{project} "
              f"(to send more tasks to it, or resume this push: --project {project})")
        if folder is not None:
            try:
                client.add_local_storage(project, folder)
                print(f"Label Studio project {project}: Local files storage on {folder}")
            except DearliError as err:
                print(f"Label Studio project {project}: its images will not show until a Local files storage on "
                      f"{folder} is added (Settings > Cloud Storage); Label Studio said: {err}")
    pushed, skipped = client.push_tasks(project, tasks)
    print(f"Label Studio project {project} at {url}: {pushed} task(s) sent, {skipped} already there")


def _export(args: argparse.Namespace) -> int:
    from dearli.annotation import label_studio as ls
    from dearli.caches.store import write_atomic
    from dearli.data.writing import refuse_existing
    from dearli.errors import DataError

    out = Path(args.out)
    pushing = args.url is not None or args.project is not None or args.create_project or args.token is not None
    if pushing:
        _push_settings(args)  # before any work: a missing option is found at once
    refuse_existing([out / TASKS_FILE, out / CONFIG_FILE], args.overwrite)
    rows, categories = ls.read_pseudo_labels(args.labels)
    if not rows:
        raise DataError(args.labels, "holds no labelled image")
    names = ls.class_names(categories, Path(args.labels) / "panoptic.json")
    paths = [row["image_path"] for row in rows]
    root = Path(args.document_root) if args.document_root else ls.default_document_root(paths)
    version = args.model_version or ls.model_version(args.labels)
    tasks = ls.tasks_from_rows(args.labels, rows, args.image_root, root, args.polygons, version)
    label_config = ls.label_config(names, args.polygons)
    write_atomic(out / CONFIG_FILE, label_config.encode())
    write_atomic(out / TASKS_FILE, json.dumps(tasks).encode())
    regions = sum(len(task["predictions"][0]["result"]) for task in tasks)
    kind = "polygon" if args.polygons else "brush"
    print(f"export label-studio: {len(tasks)} tasks with {regions} {kind} regions of {len(names)} classes: "
          f"{out / TASKS_FILE}, labeling interface {out / CONFIG_FILE}")
    local = args.image_root == LOCAL_FILES
    folder = os.path.commonpath([str(Path(p).resolve().parent) for p in paths]) if local else None
    if not (pushing and args.create_project):
        _print_steps(args, root, folder, out)
    if pushing:
        _push(args, tasks, label_config, folder)
    return 0


def _print_steps(args: argparse.Namespace, root: Path, folder: str | None, out: Path) -> None:
    if folder is not None:
        print(f"  1. start Label Studio serving the images: LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
              f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root.resolve()} label-studio start")
        print(f"  2. create a project; Settings > Cloud Storage > Add Source Storage: Local files, path {folder} "
              "(no need to sync)")
    else:
        print(f"  1.-2. create a project whose images are reachable at {args.image_root}...")
    print(f"  3. Settings > Labeling Interface > Code: paste {out / CONFIG_FILE}; then Import {out / TASKS_FILE}")
    print("     (or steps 2-3 in one: add --url URL --token TOKEN --create-project TITLE to this command)")
    print("  4. when corrected: Export > JSON, then 'dearli import label-studio EXPORT.json --dataset DATASET "
          "--partition NAME'")


def _annotations(tasks: list[dict[str, Any]], split: Any) -> tuple[list[Any], list[Any]]:
    """The dataset-ready images of the export's tasks, and every problem found."""
    from dearli.annotation.dataset_import import ImportedImage
    from dearli.annotation.label_studio_results import PROBLEM_KINDS, Problem, annotated_images
    from dearli.annotation.panoptic_regions import paint_regions
    from dearli.data.label_studio_format import class_lookup

    def size_of(stem: str) -> tuple[int, int] | None:
        return (split.record(stem).height, split.record(stem).width) if split.has(stem) else None

    annotated, problems = annotated_images(tasks, size_of)
    lookup, images = class_lookup(split.categories), []
    for item in annotated:
        segment_map, infos, found = paint_regions(item.regions, size_of(item.stem), lookup, item.task, item.stem)
        problems += found
        if infos:
            images.append(ImportedImage(item.stem, item.task, segment_map, infos))
        else:
            problems.append(Problem("nothing-usable", PROBLEM_KINDS["nothing-usable"], item.task, item.stem))
    return images, problems


def _print_problems(problems: list[Any]) -> None:
    if not problems:
        return
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted(Counter(p.kind for p in problems).items()))
    print(f"import label-studio: {len(problems)} task(s) or region(s) not imported ({counts}):")
    for problem in problems[:SHOWN_PROBLEMS]:
        print(f"  {problem.line()}")
    if len(problems) > SHOWN_PROBLEMS:
        print(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")


def _import(args: argparse.Namespace) -> int:
    from dearli.annotation.dataset_import import import_lock
    from dearli.data.dataset import load_dataset

    load_dataset(args.dataset)  # a missing or broken dataset is reported as such, before any lock is made
    with import_lock(args.dataset):
        return _import_locked(args)


def _import_locked(args: argparse.Namespace) -> int:
    from dearli.annotation.dataset_import import import_annotations, import_target, refuse_partition
    from dearli.annotation.label_studio_results import read_export
    from dearli.data.dataset import load_dataset

    info = load_dataset(args.dataset)  # read again under the lock: an import that just ended is seen
    target = import_target(info, args.split, args.partition)
    refuse_partition(target, args.overwrite)
    base = info.partition(args.base_partition) if args.base_partition else None
    tasks = read_export(args.export)
    images, problems = _annotations(tasks, target.split)
    _print_problems(problems)
    source = {"export": str(Path(args.export).resolve()), "tasks": len(tasks), "split": args.split,
              "partition": args.partition, "base_partition": args.base_partition}
    report = import_annotations(target, images, base, args.overwrite, problems, source)
    replaced = sum(1 for item in report["imported"] if item["replaced"])
    listed = len(base.labeled) if base is not None else 0
    print(f"import label-studio: {len(images)} images ({replaced} replacing an earlier annotation) into "
          f"{target.split.json_path}")
    print(f"  partition {args.partition}: {report['partition_file']}"
          + (f" ({listed} images of {args.base_partition} and the imported)" if base is not None else ""))
    print(f"  record (report.json, unusable.csv, replaced annotations): {report['record']}")
    print(f"  train on it: dearli train --dataset {args.dataset} --partition {args.partition}")
    return 0
