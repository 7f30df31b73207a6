"""``dearli serve --follow``: an endpoint that moves to each new version of a registered model as it lands.

The endpoint is given a moving reference, ``models:/NAME/latest`` or ``models:/NAME@ALIAS``. The follower
pins it to a version (``models:/NAME/N``) and serves that; every poll it looks the reference up again
(nothing is downloaded unless the version changed) and, when it names another version, reads that one and
hands it to ``deploy``: a Ray Serve redeployment, which replaces the replicas while requests keep being
answered. A version that cannot be served (a diagnostic, a broken download, a failed deployment) is skipped
once, with a line saying why, and the endpoint keeps its model; a registry out of reach is said and tried
again at the next poll. So the Train button of a Label Studio project connected to the
endpoint ends with the endpoint serving the model that run registered, with its new ``model_version``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dearli.errors import ConfigError, DataError


def is_moving(ref: str) -> bool:
    """Whether ``ref`` names a version that can change: ``models:/NAME/latest`` or ``models:/NAME@ALIAS``."""
    if not ref.startswith("models:/"):
        return False
    body = ref[len("models:/"):]
    return "@" in body or body.rpartition("/")[2].lower() == "latest"


class ModelFollower:
    """Serves the version a moving registry reference names, and moves with it (:meth:`poll`)."""

    def __init__(self, ref: str, deploy: Callable[[dict[str, Any]], Any], allow_diagnostic: bool = False,
                 tracking_uri: str | None = None):
        if not is_moving(ref):
            raise ConfigError(f"--follow: --checkpoint must name a registered model that can change "
                              f"(models:/NAME/latest or models:/NAME@ALIAS), not {ref}")
        self.ref, self.deploy, self.allow_diagnostic, self.tracking_uri = ref, deploy, allow_diagnostic, tracking_uri
        self.served: str | None = None  # the pinned version served now
        self.skipped: set[str] = set()  # versions that could not be served: not tried again

    def first(self) -> dict[str, Any]:
        """The serving payload of the version the reference names now (DataError if it cannot be served)."""
        from dearli.predict.serve import serving_payload
        from dearli.stages.registry import pinned_reference

        pinned = pinned_reference(self.ref, self.tracking_uri)
        payload = serving_payload(pinned, self.allow_diagnostic)
        self.served = pinned
        return payload

    def poll(self) -> str | None:
        """Look the reference up; deploy a new version it names. A line saying what happened, None if nothing."""
        from dearli.predict.serve import serving_payload
        from dearli.stages.registry import pinned_reference

        try:
            pinned = pinned_reference(self.ref, self.tracking_uri)
        except Exception as err:  # noqa: BLE001 - a registry that is away for a while must not end the endpoint
            why = err.problem if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
            return f"cannot look up {self.ref} ({why}); still serving {self.served}"
        if pinned == self.served or pinned in self.skipped:
            return None
        try:
            payload = serving_payload(pinned, self.allow_diagnostic)
        except DataError as err:
            self.skipped.add(pinned)
            return f"{pinned} is not served ({err.problem}); still serving {self.served}"
        try:
            self.deploy(payload)
        except Exception as err:  # noqa: BLE001 - e.g. its class list cannot be read here: keep the served model
            self.skipped.add(pinned)
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            return f"{pinned} could not be deployed ({first}); still serving {self.served}"
        previous, self.served = self.served, pinned
        return f"now serving {pinned} ({payload['model_version']}), was {previous}"
