"""``dearli serve``: the labeling endpoint (Ray Serve) of a checkpoint or registered model."""

from __future__ import annotations

import argparse
import os
import signal
import time

from dearli.predict.labeler import SERVE_MAX_PIXELS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a checkpoint as an HTTP labeling endpoint (Ray Serve)",
        description="Deploy a checkpoint (or a registered model) on Ray Serve, on the cluster in RAY_ADDRESS or a "
        "local Ray: POST an image file to the URL and get COCO panoptic JSON back (a base64 PNG of segment ids "
        "and segments_info with class names and scores). POST JSON {\"image\": BASE64, \"classes\": [{\"name\", "
        "\"isthing\"}, ...]} to label with another class list (no retraining: classes are text). GET lists the "
        "served classes. The same URL is a Label Studio ML backend (GET /health, POST /setup, /predict, "
        "/webhook): add it in a project's Settings > Model. Runs until Ctrl-C unless --detach.",
        epilog="example: dearli serve --checkpoint models:/dearli/1 --port 8000, then "
        "curl --data-binary @image.png http://127.0.0.1:8000/",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file or a registered MLflow model (models:/dearli/3)")
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help="default class list (classes.json); default: the checkpoint's dataset's")
    parser.add_argument("--host", default="127.0.0.1", help="address of the HTTP proxy (default: 127.0.0.1, this "
                        "machine only; 0.0.0.0 answers every network the machine is on: set --token)")
    parser.add_argument("--port", type=int, default=8000, help="port of the HTTP proxy (default: 8000)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas (default: 1)")
    parser.add_argument("--max-replicas", type=int, default=0, metavar="N",
                        help="autoscale between --replicas and this many replicas with the load (default: off)")
    parser.add_argument("--gpus-per-replica", type=float, default=-1.0, metavar="G",
                        help="GPUs per replica; -1 = 1 when the cluster has GPUs, else 0 (default)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="logical CPUs per replica")
    parser.add_argument("--max-ongoing-requests", type=int, default=8, metavar="N",
                        help="requests one replica holds at once; more wait in Serve's queue (default: 8)")
    parser.add_argument("--max-queued-requests", type=int, default=32, metavar="N",
                        help="requests Serve queues for the replicas; more are refused with 429 and Retry-After "
                        "(default: 32; -1 for no bound)")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, metavar="S",
                        help="a request not answered by then gets 503 and its work stops (default: 60)")
    parser.add_argument("--max-pixels", type=int, default=SERVE_MAX_PIXELS, metavar="N",
                        help=f"larger images are refused with 413 (default: {SERVE_MAX_PIXELS}, 4096×4096)")
    parser.add_argument("--token", default=os.environ.get("DEARLI_SERVE_TOKEN", ""),
                        help="requests must carry 'Authorization: Bearer TOKEN', or basic auth with TOKEN as "
                        "password (Label Studio's ML backend settings), 401 otherwise; default: $DEARLI_SERVE_TOKEN, "
                        "else no token")
    _label_studio_options(parser)
    parser.add_argument("--allow-diagnostic", action="store_true",
                        help="serve a diagnostic model anyway (a run with ssl.oracle_labels, whose student trained on "
                        "the ground truth of its unlabeled images: refused by default)")
    parser.add_argument("--detach", action="store_true",
                        help="return once deployed, leaving the endpoint on the cluster (with RAY_ADDRESS)")
    parser.add_argument("--follow", type=float, default=0.0, metavar="SECONDS",
                        help="with --checkpoint models:/NAME/latest (or @ALIAS): look the registry up every SECONDS "
                        "and serve each new version as it is registered (a diagnostic one is skipped); default: off")
    parser.set_defaults(handler=_run)


def _label_studio_options(parser: argparse.ArgumentParser) -> None:
    ls = parser.add_argument_group(
        "Label Studio ML backend", "Where /predict may read task images from: data: URIs always; Label Studio's "
        "own /data/... paths and URLs of --label-studio-url with its token; http(s) URLs of --fetch-hosts only "
        "(never with a token, no redirects); file:// URLs and /data/local-files/?d= below --files-root only.")
    ls.add_argument("--label-studio-url", default="", metavar="URL",
                    help="Label Studio's address (http://host:8080): task images given as /data/... paths are read "
                    "from it")
    ls.add_argument("--label-studio-token", default=os.environ.get("LABEL_STUDIO_API_KEY", ""), metavar="TOKEN",
                    help="Label Studio API token (personal access or legacy) for its files; default: "
                    "$LABEL_STUDIO_API_KEY")
    ls.add_argument("--fetch-hosts", default="", metavar="HOST[:PORT],...",
                    help="other hosts whose http(s) image URLs may be fetched (default: none)")
    ls.add_argument("--files-root", default="", metavar="DIR",
                    help="read file:// and /data/local-files/?d= images below this folder (default: no local files)")
    ls.add_argument("--max-tasks", type=int, default=16, metavar="N",
                    help="tasks in one /predict request; more get 413 (default: 16). For many tasks push predictions "
                    "in bulk: dearli pseudo-label, then dearli export label-studio --url")
    ls.add_argument("--train-command", default="", metavar="TEMPLATE",
                    help="a START_TRAINING webhook event submits this command line as a Ray job, with {project}, "
                    "{model_version} and {label_studio_url} filled in, one run at a time (default: none, such "
                    "events get 400)")
    ls.add_argument("--jobs-address", default="", metavar="URL",
                    help="Ray's job API for --train-command (http://head:8265); default: Ray's own lookup "
                    "($RAY_API_SERVER_ADDRESS or $RAY_ADDRESS, which also win over this option, else this cluster)")


def _run(args: argparse.Namespace) -> int:
    from ray import serve

    from dearli.predict.serve import payload_app, serving_payload, start
    from dearli.predict.serve_options import ServeOptions
    from dearli.runtime import ensure_ray

    options = ServeOptions(replicas=args.replicas, max_replicas=args.max_replicas,
                           gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                           max_ongoing_requests=args.max_ongoing_requests,
                           max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout_s,
                           max_pixels=args.max_pixels, token=args.token, max_tasks=args.max_tasks,
                           label_studio_url=args.label_studio_url, label_studio_token=args.label_studio_token,
                           fetch_hosts=args.fetch_hosts, files_root=args.files_root,
                           train_command=args.train_command, jobs_address=args.jobs_address)
    options.validate()
    follower = _follower(args, options)
    # a refused model starts no Ray
    payload = follower.first() if follower else serving_payload(args.checkpoint, args.allow_diagnostic)
    ensure_ray()
    url = start(payload_app(payload, args.classes, options), args.host, args.port, options.request_timeout_s)
    guard = "with a token" if options.token else "without a token: anyone who reaches the port can use it"
    what = f"{args.checkpoint} ({follower.served}, followed every {args.follow:g} s)" if follower else args.checkpoint
    print(f"serving {what} at {url} (POST an image; GET the classes; a Label Studio ML backend), {guard}", flush=True)
    if args.detach:
        return 0

    def stop(signum: int, frame: object) -> None:  # `kill` ends the endpoint as Ctrl-C does (and its local Ray)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(args.follow or 3600)
            said = follower.poll() if follower else None
            if said:
                print(f"dearli serve: {said}", flush=True)
    except KeyboardInterrupt:
        print("stopping the endpoint", flush=True)
        serve.shutdown()
    return 0


def _follower(args: argparse.Namespace, options: object):
    """The :class:`~dearli.predict.model_follower.ModelFollower` of ``--follow``, or None without it."""
    from dearli.errors import ConfigError
    from dearli.predict.model_follower import ModelFollower
    from dearli.predict.serve import payload_app, start

    if not args.follow:
        return None
    if not 0 < args.follow < 86400 or args.detach:
        raise ConfigError("--follow: give a number of seconds between 0 and 86400, and no --detach (the command "
                          "follows the registry for as long as it runs)")

    def deploy(payload: dict) -> None:
        start(payload_app(payload, args.classes, options), args.host, args.port, options.request_timeout_s)

    return ModelFollower(args.checkpoint, deploy, args.allow_diagnostic)
