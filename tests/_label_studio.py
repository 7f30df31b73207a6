"""A real Label Studio server for tests: ``label-studio start`` from ``.venv-label-studio`` (its own virtualenv,
made by ``tests/label_studio_env.sh``: its pins clash with dearli's) on 127.0.0.1, sqlite in a temp dir.

Like the services of ``_services.py`` it runs in a process group of its own, stopped by that group's id when the
block ends. The tests reach it over HTTP only; :class:`HeadlessChromium` with :func:`login_cookies` shows its
pages logged in, and :func:`brush_rle` encodes masks with Label Studio's own SDK.

Nothing leaves the machine: ``LATEST_VERSION_CHECK=false`` stops the PyPI query Label Studio makes on import,
``SENTRY_DSN``/``FRONTEND_SENTRY_DSN`` empty turn off its error reporting (server and browser),
``COLLECT_ANALYTICS=false`` its usage log posts and the pages' analytics; feature flags are read from the
package's file (the default, ``FEATURE_FLAGS_OFFLINE``). ``HOME`` is the temp dir, so no default data folder
is made in the user's home.

ML backends: ``ML_BLOCK_LOCAL_IP=false`` and ``SSRF_PROTECTION_ENABLED=false`` let a project connect the
``dearli serve`` the tests run on 127.0.0.1 (by default Label Studio refuses an ML backend, and the webhook it
adds for it, on loopback and private addresses), and the health, setup and connection timeouts of 1 to 3 s
become 30 s, which a busy 2-core machine can miss.

Tokens: the organization is created with legacy tokens enabled (``--enable-legacy-api-token``, at start-up)
and the user's legacy token set by ``--user-token``; a personal access token (a JWT refresh token, Label
Studio 1.23's default kind) is then made over HTTP with ``POST /api/token/``.
"""

from __future__ import annotations

import base64
import contextlib
import http.cookiejar
import json
import os
import re
import select
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _services import _stop_group, free_port

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-label-studio"
INSTALL = "tests/label_studio_env.sh"
USER = "annotator@example.com"
PASSWORD = "dearli-test-password"
LEGACY_TOKEN = "dearli0legacy0token0for0tests"


@dataclass(frozen=True)
class LabelStudio:
    url: str
    user: str
    password: str
    legacy_token: str  # ``Authorization: Token ...`` (legacy tokens are on for the organization)
    access_token: str  # a personal access token: a JWT refresh token for ``/api/token/refresh/``
    log: Path
    files_root: Path | None = None  # LOCAL_FILES_DOCUMENT_ROOT, where local files are served from


def missing() -> str | None:
    """Why the server cannot start here, or None."""
    if not (VENV / "bin" / "label-studio").exists():
        return (f"Label Studio is not installed in {VENV.name}/ (the label_studio tests need it): "
                f"run {INSTALL} in the repository root (about 1 GB, 1-2 minutes)")
    return None


def _own_python_env() -> dict[str, str]:
    """The outer environment without a ``PYTHONPATH``, virtualenv or Django/Label Studio settings of the caller."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))}


def server_env(root: Path) -> dict[str, str]:
    """The outer environment without what would steer Label Studio (its own ``LABEL_STUDIO_*`` settings, a
    ``PYTHONPATH`` or virtualenv of the caller), plus the settings that keep it offline and in ``root``."""
    env = _own_python_env()
    env.update(HOME=str(root), LABEL_STUDIO_BASE_DATA_DIR=str(root / "data"), LATEST_VERSION_CHECK="false",
               SENTRY_DSN="", FRONTEND_SENTRY_DSN="", COLLECT_ANALYTICS="false", LOG_LEVEL="WARNING",
               ML_BLOCK_LOCAL_IP="false", SSRF_PROTECTION_ENABLED="false", ML_TIMEOUT_HEALTH="30",
               ML_TIMEOUT_SETUP="30", ML_CONNECTION_TIMEOUT="30")
    return env


def _call(url: str, method: str = "GET", token: str | None = None, body=None, timeout: float = 10.0):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Token {token}"
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers, method=method),
                                timeout=timeout) as response:
        return json.loads(response.read())


def _wait_up(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    """The server's URL once ``/health`` answers UP. The port is read from the server's own line: Label Studio
    moves to the next port by itself when the one asked for is taken."""
    deadline = time.monotonic() + timeout_s
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"label-studio start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if url is None:
            found = re.search(r"Starting development server at (http://127\.0\.0\.1:\d+)/", log.read_text())
            url = found and found[1]
        if url:
            with contextlib.suppress(OSError, ValueError):
                if _call(f"{url}/health", timeout=2).get("status") == "UP":
                    return url
        time.sleep(0.5)
    raise RuntimeError(f"Label Studio did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def label_studio_server(root: Path, timeout_s: float = 300.0, env: dict[str, str] | None = None
                        ) -> Iterator[LabelStudio]:
    """``label-studio start`` on 127.0.0.1 with its data in ``root``; yields its URL, user and two tokens.
    ``env``: more settings, e.g. ``LOCAL_FILES_SERVING_ENABLED`` and ``LOCAL_FILES_DOCUMENT_ROOT`` to serve
    images from a folder."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    cmd = [str(VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
           "--port", str(free_port()), "--data-dir", str(root / "data"), "--username", USER, "--password",
           PASSWORD, "--user-token", LEGACY_TOKEN, "--enable-legacy-api-token"]
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                env={**server_env(root), **(env or {})}, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        url = _wait_up(proc, log, timeout_s)
        access = _call(f"{url}/api/token/", "POST", LEGACY_TOKEN, {})["token"]
        print(f"Label Studio up at {url} in {time.monotonic() - started:.1f} s")
        served = (env or {}).get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
        yield LabelStudio(url, USER, PASSWORD, LEGACY_TOKEN, access, log, Path(served) if served else None)
    finally:
        _stop_group(proc)


def brush_rle(mask) -> list[int]:
    """Label Studio's brush RLE of a 2-D boolean mask, by the encoder of its own SDK (in the server's virtualenv:
    ``label_studio_sdk.converter.brush.encode_rle`` of the mask as RGBA bytes)."""
    import numpy as np

    height, width = mask.shape
    code = ("import sys, json, numpy as np; from label_studio_sdk.converter.brush import encode_rle; "
            f"m = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape({height}, {width}); "
            "print(json.dumps([int(v) for v in encode_rle(np.repeat(m.reshape(-1, 1), 4, axis=1).reshape(-1))]))")
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", code], input=(np.asarray(mask, bool) * 255).astype(
        np.uint8).tobytes(), capture_output=True, check=True, env=_own_python_env(), timeout=120).stdout
    return json.loads(out)


def _sdk(code: str, payload) -> object:
    """``code`` run by the server's virtualenv with ``payload`` as JSON on stdin; what it prints, as JSON."""
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", code], input=json.dumps(payload).encode(),
                         capture_output=True, check=True, env=_own_python_env(), timeout=300).stdout
    return json.loads(out)


def brush_rles(masks) -> list[list[int]]:
    """:func:`brush_rle` of many 2-D boolean masks, in one run of the SDK."""
    import numpy as np

    code = ("import sys, json, numpy as np; from label_studio_sdk.converter.brush import encode_rle; "
            "print(json.dumps([[int(v) for v in encode_rle(np.repeat(np.array(m, np.uint8).reshape(-1, 1) * 255, "
            "4, axis=1).reshape(-1))] for m in json.load(sys.stdin)]))")
    return _sdk(code, [np.asarray(m, bool).astype(int).tolist() for m in masks])


def decode_brush_rles(rles: list[list[int]], shapes: list[tuple[int, int]]):
    """The H×W boolean masks of brush RLEs, decoded by Label Studio's SDK (``decode_rle``; a pixel is in the
    mask where its alpha is at least 128), in one run."""
    import numpy as np

    code = ("import sys, json, numpy as np; from label_studio_sdk.converter.brush import decode_rle; "
            "print(json.dumps([decode_rle(r).reshape(-1, 4)[:, 3].tolist() for r in json.load(sys.stdin)]))")
    alphas = _sdk(code, rles)
    return [np.asarray(a).reshape(shape) >= 128 for a, shape in zip(alphas, shapes)]


def login_cookies(server: LabelStudio) -> dict[str, str]:
    """The cookies of a browser logged in as the server's user: the login form posted over HTTP (its CSRF
    token read from the page)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login = f"{server.url}/user/login/"
    with opener.open(login, timeout=30) as response:
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.read().decode())[1]
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": csrf, "email": server.user, "password": server.password,
                                   "persist_session": "on"}).encode()
    with opener.open(urllib.request.Request(login, data=form, headers={"Referer": login}), timeout=30) as response:
        assert "/user/login" not in response.url, f"the login form refused {server.user}"
    cookies = {cookie.name: cookie.value for cookie in jar}
    assert "sessionid" in cookies, sorted(cookies)
    return cookies


class HeadlessChromium:
    """Debian's ``chromium --headless`` driven over ``--remote-debugging-pipe`` (the DevTools protocol as
    NUL-separated JSON on the browser's fds 3 and 4): cookies can be set before a page opens, which the
    ``--screenshot`` command line cannot do. One page; :meth:`close` stops its process group."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]

    def __init__(self, profile: Path, width: int = 1400, height: int = 900):
        chromium = shutil.which("chromium")
        assert chromium, "Debian's chromium is part of the test setup (README's test command installs it)"
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()

        def on_fds_3_and_4():  # in the child, before exec
            read, write = os.dup(to_browser), os.dup(from_browser)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self._log = open(profile.with_suffix(".log"), "w")
        self.proc = subprocess.Popen(
            [chromium, *self.FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"], pass_fds=(3, 4), preexec_fn=on_fds_3_and_4,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._count = 0
        self._buffer = b""
        self._session = None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1, "mobile": False})

    def send(self, method: str, params: dict | None = None, timeout_s: float = 60.0) -> dict:
        """One DevTools command (to the page once attached, else to the browser); its result."""
        self._count += 1
        message = {"id": self._count, "method": method, "params": params or {}}
        if self._session and not method.startswith(("Target.", "Storage.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._answers], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method} within {timeout_s:.0f} s")
                chunk = os.read(self._answers, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe:\n{self._log.name}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._count:
                if "error" in answer:
                    raise RuntimeError(f"chromium {method}: {answer['error']}")
                return answer["result"]

    def open(self, url: str, cookies: dict[str, str] | None = None, timeout_s: float = 60.0) -> None:
        """Go to ``url`` with ``cookies`` set for its host; returns once the document has loaded."""
        host = urllib.parse.urlparse(url).hostname
        if cookies:
            self.send("Storage.setCookies", {"cookies": [{"name": k, "value": v, "domain": host, "path": "/"}
                                                         for k, v in cookies.items()]})
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # the page of about:blank answers until the new one commits
            with contextlib.suppress(RuntimeError):
                state = self.send("Runtime.evaluate", {"expression": "location.href + ' ' + document.readyState"})
                if state["result"].get("value", "").endswith(" complete") and not state["result"]["value"].startswith(
                        "about:"):
                    return
            time.sleep(0.25)
        raise TimeoutError(f"chromium did not load {url} within {timeout_s:.0f} s")

    def text(self) -> str:
        return self.send("Runtime.evaluate", {"expression": "document.body ? document.body.innerText : ''"})[
            "result"].get("value", "")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout_s=10)
        _stop_group(self.proc, grace_s=5)
        for fd in (self._commands, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()
