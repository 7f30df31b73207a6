"""Training runs that ``dearli serve``'s Label Studio webhook asks for: a command submitted as a Ray job."""

from __future__ import annotations

from dearli.predict.labeler import RequestError


def submit_training(address: str, command: str, project: int, version: str) -> str:
    """Submit ``command`` as a Ray job at ``address`` (Ray's job API; empty: Ray's own lookup, in which
    ``$RAY_API_SERVER_ADDRESS`` and ``$RAY_ADDRESS`` win over any address); its job id. RequestError 409 while
    a training job submitted this way (for any project: one training run at a time, however many events come)
    is still pending or running, 503 when Ray's job API cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    key = "dearli.label_studio_project"
    try:
        client = JobSubmissionClient(address or None)
        for job in client.list_jobs():
            running = (job.metadata or {}).get(key)
            if running is not None and not job.status.is_terminal():
                raise RequestError(409, f"a training run of project {running} is still {job.status.value.lower()}: "
                                        f"job {job.submission_id}")
        return client.submit_job(entrypoint=command, metadata={key: str(project), "dearli.model_version": version})
    except RequestError:
        raise
    except Exception as err:  # noqa: BLE001 - unreachable, refused, no dashboard: one line, never a 500
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise RequestError(503, f"cannot submit the training job to Ray's job API ({address or 'found by Ray'}): "
                                f"{first}") from None
