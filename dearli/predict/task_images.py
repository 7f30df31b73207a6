"""The image of a Label Studio task, read only from where the endpoint's operator allowed.

A task names its image by a string in its ``data``; :class:`ImageSources` turns it into the image file's bytes,
or refuses with a :class:`~dearli.predict.labeler.RequestError` saying why:

- ``data:image/...;base64,...``: always read (its bytes came with the request, within the request's bound);
- ``/data/...`` and any other path starting with ``/`` (what Label Studio writes for uploaded files, local
  files and cloud storage it proxies): fetched from ``label_studio_url`` with its API token; refused without
  one. ``/data/local-files/?d=PATH`` is read from ``files_root`` instead when that is set;
- ``http://`` and ``https://`` URLs: fetched only when the URL's origin is ``label_studio_url``'s (then with
  its token) or its host is in ``fetch_hosts`` (``host`` for the scheme's default port, ``host:port`` for
  another; never with the token);
- ``file://`` URLs: read only when ``files_root`` is set and the file, symbolic links resolved, lies inside it.

Anything else (``s3://``, ``gs://``, a plain name) is refused. Every fetch has a timeout, reads at most
``max_bytes`` (declared length checked first, then counted as it arrives), never follows a redirect (a 3xx is a
refusal: a redirect could lead to a host not allowed, and would carry the token along). The token goes to
Label Studio's origin only.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dearli.predict.labeler import MAX_REQUEST_BYTES, RequestError

FETCH_TIMEOUT_S = 15.0  # per fetch: connecting and every read; the whole fetch also stops at twice this
LOCAL_FILES = "/data/local-files/"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 1 << 16


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, lower-cased; None for anything else or a malformed port."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    return scheme, parts.hostname.lower(), port


def parse_hosts(hosts: str) -> frozenset[tuple[str, int | None]]:
    """``--fetch-hosts`` (comma-separated ``host`` or ``host:port``) as (host, port or None) pairs; ValueError
    for an entry that is not one."""
    allowed = set()
    for entry in filter(None, (h.strip() for h in hosts.split(","))):
        if "/" in entry or "@" in entry:
            raise ValueError(f"{entry!r} is not a host or host:port (no scheme, user or path)")
        parts = urllib.parse.urlsplit(f"//{entry}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{entry!r} has no valid port") from None
        if not parts.hostname:
            raise ValueError(f"{entry!r} names no host")
        allowed.add((parts.hostname.lower(), port))
    return frozenset(allowed)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed", headers, fp)


@dataclass
class ImageSources:
    """Where task images may come from (see the module docstring). ``label_studio_auth`` makes the
    ``Authorization`` header for Label Studio (``renew=True`` after a 401); None: no token."""

    fetch_hosts: frozenset[tuple[str, int | None]] = frozenset()
    label_studio_url: str = ""
    label_studio_auth: Callable[[bool], str] | None = None
    files_root: str = ""
    max_bytes: int = MAX_REQUEST_BYTES
    timeout_s: float = FETCH_TIMEOUT_S
    _opener: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.label_studio_url = self.label_studio_url.rstrip("/")
        self._opener = urllib.request.build_opener(_NoRedirect)

    def read(self, reference: Any, check: Callable[[], None] | None = None) -> bytes:
        """The bytes of the image ``reference`` names; RequestError (one line) when it may not or cannot be
        read. ``check`` is called between chunks of a fetch and may raise to stop it."""
        if not isinstance(reference, str) or not reference.strip():
            raise RequestError(400, "the task's image is not a URL string")
        reference = reference.strip()
        lowered = reference[:16].lower()
        if lowered.startswith("data:"):
            return self._data_uri(reference)
        if reference.startswith("/") and not reference.startswith("//"):
            return self._label_studio_path(reference, check)
        if lowered.startswith(("http://", "https://")):
            return self._url(reference, check)
        if lowered.startswith("file://"):
            return self._file(urllib.parse.unquote(urllib.parse.urlsplit(reference).path))
        scheme = reference.split(":", 1)[0] if ":" in reference else ""
        what = f"{scheme}:// URLs are" if scheme.isalnum() else "a reference like this is"
        raise RequestError(400, f"{what} not read: give the task a data: URI, an http(s) URL of an allowed host "
                                "or a Label Studio /data/ path")

    # -- kinds -----------------------------------------------------------------------------------------------

    def _data_uri(self, reference: str) -> bytes:
        header, comma, payload = reference.partition(",")
        if not comma or ";base64" not in header.lower():
            raise RequestError(400, "a data: URI of an image must be base64 (data:image/png;base64,...)")
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise RequestError(413, f"the data: URI holds more than {self.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "the data: URI is not valid base64") from None

    def _label_studio_path(self, path: str, check: Callable[[], None] | None) -> bytes:
        if path.startswith(LOCAL_FILES) and self.files_root:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
            relative = query.get("d", [""])[0]
            if not relative:
                raise RequestError(400, "a /data/local-files/ URL without ?d=PATH")
            return self._file(str(Path(self.files_root) / relative.lstrip("/")))
        if not self.label_studio_url:
            raise RequestError(400, f"the image {_short(path)} is a Label Studio path: start the endpoint with "
                                    "--label-studio-url (and a token) to read it")
        return self._url(self.label_studio_url + path, check)

    def _url(self, url: str, check: Callable[[], None] | None) -> bytes:
        origin = _origin(url)
        if origin is None:
            raise RequestError(400, f"{_short(url)} is not a valid http(s) URL")
        scheme, host, port = origin
        own = self.label_studio_url and origin == _origin(self.label_studio_url)
        if not own and (host, port) not in self.fetch_hosts and not (
                port == _DEFAULT_PORTS[scheme] and (host, None) in self.fetch_hosts):
            where = f"{host}:{port}" if port != _DEFAULT_PORTS[scheme] else host
            raise RequestError(403, f"images are not fetched from {where}: not the Label Studio host nor in "
                                    "--fetch-hosts")
        if own and self.label_studio_auth is not None:
            try:
                return self._fetch(url, self.label_studio_auth(False), check, renewable=True)
            except _Unauthorized:  # an access token of Label Studio's lasts minutes: once more with a new one
                return self._fetch(url, self.label_studio_auth(True), check)
        return self._fetch(url, None, check)

    def _fetch(self, url: str, auth: str | None, check: Callable[[], None] | None, renewable: bool = False) -> bytes:
        headers = {"Accept": "*/*", "User-Agent": "dearli-serve"}  # Label Studio answers 406 to image/*
        if auth:
            headers["Authorization"] = auth
        deadline = time.monotonic() + 2 * self.timeout_s
        try:
            with self._opener.open(urllib.request.Request(url, headers=headers), timeout=self.timeout_s) as answer:
                declared = answer.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise RequestError(413, f"the image at {_short(url)} has {declared} bytes, more than "
                                            f"{self.max_bytes}")
                chunks, size = [], 0
                while chunk := answer.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise RequestError(413, f"the image at {_short(url)} exceeds {self.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise RequestError(400, f"the image at {_short(url)} did not arrive within "
                                                f"{2 * self.timeout_s:g} s")
                    if check is not None:
                        check()
                    chunks.append(chunk)
                return b"".join(chunks)
        except urllib.error.HTTPError as err:
            if err.code == 401 and renewable:
                raise _Unauthorized from None
            reason = err.reason if 300 <= err.code < 400 else f"HTTP {err.code}"
            raise RequestError(400, f"the image at {_short(url)} could not be fetched: {reason}") from None
        except (OSError, ValueError) as err:  # refused, unreachable, timed out, a broken answer
            reason = getattr(err, "reason", None) or err
            raise RequestError(400, f"the image at {_short(url)} could not be fetched: {reason}") from None

    def _file(self, path: str) -> bytes:
        if not self.files_root:
            raise RequestError(403, "local files are not read: start the endpoint with --files-root DIR")
        root = os.path.realpath(self.files_root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise RequestError(403, f"{_short(path)} lies outside --files-root")
        try:
            info = os.stat(real)
            if not stat.S_ISREG(info.st_mode):
                raise RequestError(400, f"{_short(path)} is not a file")
            if info.st_size > self.max_bytes:
                raise RequestError(413, f"{_short(path)} has {info.st_size} bytes, more than {self.max_bytes}")
            with open(real, "rb") as fh:
                data = fh.read(self.max_bytes + 1)
        except OSError as err:
            raise RequestError(400, f"{_short(path)} cannot be read: {err.strerror or err}") from None
        if len(data) > self.max_bytes:
            raise RequestError(413, f"{_short(path)} exceeds {self.max_bytes} bytes")
        return data


class _Unauthorized(Exception):
    """Label Studio answered 401: the access token may have expired."""


def _short(text: str, limit: int = 80) -> str:
    """A URL or path for a reason: without its query (it may hold a signature) and cut short."""
    text = text.split("?", 1)[0] if not text.startswith(LOCAL_FILES) else text
    return text if len(text) <= limit else text[:limit - 3] + "..."
