"""The command-line commands of :mod:`dearli.predict`, one module each: ``dearli predict``, ``dearli
pseudo-label``, ``dearli suggest``, ``dearli serve`` and ``dearli review``."""
