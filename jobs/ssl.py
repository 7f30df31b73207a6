"""Main job: the whole DEARLi pipeline (SAM/CLIP caches, DeWa warm-up, Mean Teacher, evaluation) on Ray,
tracked in MLflow.

Runs as a plain script or as a Ray job (``ray job submit --working-dir . -- python jobs/ssl.py``). Without
arguments it trains the synth preset on the synthetic world; ``--help`` lists the options.
"""

import os
import sys

# This file shares its name with the standard library's ``ssl``, and ``python jobs/ssl.py`` puts jobs/
# first on sys.path: every later ``import ssl`` (urllib, requests, mlflow, ray) would import this file.
# So the folder leaves sys.path before anything else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
# A Ray job's output is a pipe: without line buffering the log would arrive in blocks, late.
sys.stdout.reconfigure(line_buffering=True)

if __name__ == "__main__":
    from dearli.stages.pipeline import main

    sys.exit(main())
