"""Build of dearli's optional C extension; everything else about the package is in pyproject.toml.

The extension only speeds up reading panoptic PNGs in evaluation: where it cannot be compiled, the
install goes on without it and evaluation decodes with Pillow (same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dearli.evaluation._runs", ["dearli/evaluation/_runs.c"], optional=True)])
