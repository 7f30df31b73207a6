"""A small client of Label Studio's REST API (written against 1.23): projects, resumable task import with
predictions, export and annotations. Standard library only.

Tokens: Label Studio 1.23 gives each user a personal access token (a JWT refresh token, exchanged at
``/api/token/refresh/`` for an access token of 5 minutes, sent as ``Authorization: Bearer``) and keeps the
older per-user token (``Authorization: Token``) for organizations that enable legacy tokens. :class:`Client`
tries the first and then the second, and fetches a new access token when one expires.

Every failure is a one-line :class:`~dearli.errors.DearliError` naming the method, URL, HTTP status and Label
Studio's reason; tokens never appear in messages.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from dearli.errors import DearliError

STEM = "dearli_stem"  # the task data field that names a task's image; push_tasks skips stems already there


class _Failure(Exception):
    """An HTTP answer other than 2xx (status and Label Studio's reason), before it becomes a DearliError."""

    def __init__(self, method: str, url: str, status: int, reason: str):
        self.method, self.url, self.status, self.reason = method, url, status, reason
        super().__init__(f"Label Studio {method} {url}: HTTP {status} {reason}".rstrip())


def _reason(body: bytes, fallback: str) -> str:
    """Label Studio's error JSON as one short line: ``detail`` and any ``validation_errors``."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        text = " ".join(body.decode("utf-8", "replace").split())
        return (text if text and not text.startswith("<") else fallback)[:200]
    parts = [str(answer.get("detail") or fallback)]
    errors = answer.get("validation_errors")
    if isinstance(errors, dict):
        parts += [f"{field}: {' '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
                  for field, msgs in errors.items()]
    elif errors:
        parts.append(str(errors))
    return " ".join("; ".join(parts).split())[:300]


class Client:
    """A Label Studio server at ``url`` (``http://host:port``), as the owner of ``token``: a personal access
    token (Account & Settings in Label Studio 1.23) or a legacy token where the organization allows them."""

    def __init__(self, url: str, token: str, timeout: float = 120.0):
        if not url.startswith(("http://", "https://")):
            raise DearliError(f"Label Studio URL must start with http:// or https://, not {url!r}")
        if not token:
            raise DearliError(f"no token for Label Studio at {url}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._bearer = False
        self._auth = ""
        self._authenticate()

    # -- transport -------------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: Any = None, query: dict | None = None,
              auth: str | None = None) -> Any:
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = auth
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            raise _Failure(method, url, err.code, _reason(err.read(), err.reason or "")) from None
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise DearliError(f"Label Studio at {self.url} cannot be reached ({method} {url}: {reason})") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise DearliError(f"Label Studio {method} {url}: HTTP {status} but no JSON in the answer "
                              f"(is {self.url} a Label Studio server?)") from None

    def _refresh(self) -> None:
        answer = self._send("POST", "/api/token/refresh/", {"refresh": self._token})
        if not isinstance(answer, dict) or not answer.get("access"):
            raise _Failure("POST", f"{self.url}/api/token/refresh/", 200, "no access token in the answer")
        self._auth = f"Bearer {answer['access']}"

    def _authenticate(self) -> None:
        """A personal access token if ``/api/token/refresh/`` takes it, else a legacy token if the server
        accepts it; a clear error when neither."""
        try:
            self._refresh()
            self._bearer = True
            return
        except _Failure as err:
            if err.status >= 500:
                raise DearliError(str(err)) from None
            as_pat = err
        try:
            self._send("GET", "/api/current-user/whoami", auth=f"Token {self._token}")
        except _Failure as err:
            if err.status in (401, 403):
                raise DearliError(
                    f"Label Studio at {self.url} refused the token: not a personal access token "
                    f"({as_pat.reason or f'HTTP {as_pat.status}'}) nor an accepted legacy token ({err.reason}); "
                    "copy the access token from Account & Settings in Label Studio") from None
            raise DearliError(str(err)) from None
        self._auth = f"Token {self._token}"

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header of this client's requests, for reading the server's files (uploads)."""
        return self._auth

    def renew(self) -> None:
        """A new access token for a personal access token (its access tokens last minutes); nothing for a
        legacy token."""
        if self._bearer:
            try:
                self._refresh()
            except _Failure as err:
                raise DearliError(str(err)) from None

    def _api(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        """One authenticated call; an expired access token is refreshed once."""
        try:
            try:
                return self._send(method, path, body, query, self._auth)
            except _Failure as err:
                if not (self._bearer and err.status == 401):
                    raise
                self._refresh()
                return self._send(method, path, body, query, self._auth)
        except _Failure as err:
            raise DearliError(str(err)) from None

    # -- projects and tasks ----------------------------------------------------------------------------------

    def create_project(self, title: str, label_config: str, model_version: str | None = None,
                       description: str = "") -> int:
        """A new project; returns its id. ``model_version`` is the predictions' version the labeling view
        pre-annotates with (Label Studio sets it from the first imported prediction when left empty)."""
        body = {"title": title, "label_config": label_config, "description": description}
        if model_version:
            body["model_version"] = model_version
        return int(self._api("POST", "/api/projects", body)["id"])

    def add_local_storage(self, project_id: int, folder: str, title: str = "dearli images") -> int:
        """Connect a "Local files" source storage on ``folder`` (on the server's machine, below its
        ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``) to the project, so that its ``/data/local-files/?d=`` image
        URLs are served; nothing is synced. Returns the storage's id; Label Studio's reason when it refuses
        (local files not served, or the folder outside the document root) comes back as a one-line error."""
        body = {"project": int(project_id), "path": folder, "title": title, "use_blob_urls": True}
        return int(self._api("POST", "/api/storages/localfiles", body)["id"])

    def project(self, project_id: int) -> dict:
        return self._api("GET", f"/api/projects/{int(project_id)}")

    def tasks(self, project_id: int, full: bool = True, page_size: int = 100) -> list[dict]:
        """Every task of the project, page by page; ``full`` includes annotations and predictions."""
        found: list[dict] = []
        page = 1
        while True:
            query = {"project": int(project_id), "page": page, "page_size": page_size, "resolve_uri": "false"}
            if full:
                query["fields"] = "all"
            answer = self._api("GET", "/api/tasks", query=query)
            batch = answer.get("tasks", []) if isinstance(answer, dict) else answer
            found += batch
            total = answer.get("total", len(found)) if isinstance(answer, dict) else len(found)
            if not batch or len(found) >= total:
                return found
            page += 1

    def stems(self, project_id: int) -> set[str]:
        """The ``data.dearli_stem`` of every task already in the project."""
        return {task["data"][STEM] for task in self.tasks(project_id, full=False)
                if isinstance(task.get("data"), dict) and STEM in task["data"]}

    def push_tasks(self, project_id: int, tasks: Iterable[dict], chunk: int = 100,
                   progress: Callable[[str], Any] | None = print) -> tuple[int, int]:
        """Import ``tasks`` (each ``{"data": {..., "dearli_stem": ...}, "predictions": [...]}``) ``chunk`` per
        request, skipping stems the project (or an earlier task of ``tasks``) holds already, so an
        interrupted push resumes where it stopped. Prints one line per chunk; returns (pushed, skipped)."""
        if chunk < 1:
            raise DearliError(f"push_tasks: chunk must be at least 1, not {chunk}")
        seen = self.stems(project_id)
        new: list[dict] = []
        skipped = 0
        for i, task in enumerate(tasks):
            stem = task.get("data", {}).get(STEM) if isinstance(task, dict) else None
            if not isinstance(stem, str) or not stem:
                raise DearliError(f"push_tasks: task {i} has no data.{STEM} (the image's stem)")
            if stem in seen:
                skipped += 1
            else:
                seen.add(stem)
                new.append(task)
        pushed = 0
        for start in range(0, len(new), chunk):
            part = new[start:start + chunk]
            answer = self._api("POST", f"/api/projects/{int(project_id)}/import", part)
            if not isinstance(answer, dict) or answer.get("task_count") != len(part):
                raise DearliError(f"Label Studio POST {self.url}/api/projects/{int(project_id)}/import: expected "
                                  f"{len(part)} tasks imported at once, the answer was {str(answer)[:200]}")
            pushed += len(part)
            if progress:
                progress(f"Label Studio project {project_id}: {pushed}/{len(new)} tasks pushed "
                         f"({answer.get('prediction_count')} predictions in this chunk), {skipped} there already")
        if progress and not new:
            progress(f"Label Studio project {project_id}: nothing to push, {skipped} tasks there already")
        return pushed, skipped

    def export(self, project_id: int, all_tasks: bool = False) -> list[dict]:
        """The project's JSON export: tasks with their annotations (only annotated tasks unless
        ``all_tasks``; predictions appear there as ids, :meth:`tasks` has them in full)."""
        query = {"exportType": "JSON", "download_all_tasks": "true" if all_tasks else "false"}
        return self._api("GET", f"/api/projects/{int(project_id)}/export", query=query)

    def annotate(self, task_id: int, result: list[dict], annotation_id: int | None = None) -> int:
        """Create an annotation of the task with ``result`` (Label Studio regions), or replace the result of
        annotation ``annotation_id``; returns the annotation's id."""
        if annotation_id is None:
            answer = self._api("POST", f"/api/tasks/{int(task_id)}/annotations", {"result": result})
        else:
            answer = self._api("PATCH", f"/api/annotations/{int(annotation_id)}", {"result": result})
        return int(answer["id"])
