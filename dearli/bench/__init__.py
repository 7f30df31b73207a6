"""Benchmarks, run as ``dearli bench NAME``: they print numbers; tests never time anything."""
