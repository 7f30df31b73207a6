"""Main job: the whole DEARLi pipeline (SAM/CLIP caches, DeWa warm-up, Mean Teacher, evaluation) on Ray,
tracked in MLflow.

Runs as a plain script or as a Ray job (``ray job submit --working-dir . -- python jobs/ssl.py``). Without
arguments it trains the synth preset on the synthetic world; ``--help`` lists the options.
"""

import sys

from dearli.job_script import prepare_job_script  # imports nothing: jobs/ leaves sys.path before ``ssl`` is imported

prepare_job_script(__file__)

if __name__ == "__main__":
    from dearli.stages.pipeline import main

    sys.exit(main())
