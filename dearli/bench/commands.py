"""``dearli bench``: benchmarks that print numbers (speed, memory, throughput)."""

from __future__ import annotations

import argparse
import importlib

# Modules defining register(bench_subparsers) for one benchmark each.
BENCH_MODULES = (
    "dearli.bench.evaluate",  # dearli bench evaluate
    "dearli.bench.step",  # dearli bench step
    "dearli.bench.cache",  # dearli bench cache
    "dearli.bench.ssl",  # dearli bench ssl
    "dearli.bench.ablation",  # dearli bench ablation
    "dearli.bench.gpu",  # dearli bench gpu
    "dearli.bench.serve",  # dearli bench serve
    "dearli.bench.scale",  # dearli bench scale
    "dearli.bench.scoring",  # dearli bench test-world
    "dearli.bench.annotation",  # dearli bench annotation
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark and print its numbers",
        description="Benchmarks on the synthetic world: evaluation speed, training-step cost, cache throughput, "
        "paper-scale GPU costs.",
    )
    bench = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(bench)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
