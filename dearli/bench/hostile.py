"""Hostile traffic for the labeling endpoint: every kind of request a client controls that once took a replica
down or got a 500, each with the status it must get, mixed with good requests at more than the endpoint takes.

Used by ``dearli bench serve --hostile`` and by the serve tests; it only ever talks to the URL it is given
(loopback in both), with a bounded number of requests, each with a timeout.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

TIMEOUT_S = 120  # per request
UNDER_LOAD = 429  # Serve's answer past its queue, to any request


@dataclass(frozen=True)
class Probe:
    """One request: a body, its headers, the statuses it may get (good requests: 200, or 429 when refused for
    load) and, for the chunked kind, the body sent in pieces without a length."""

    kind: str
    body: bytes
    headers: dict[str, str]
    expect: tuple[int, ...]
    chunked_mb: int = 0
    image: int = -1  # good requests: the index of the image sent


@dataclass
class Outcome:
    kind: str
    status: int
    seconds: float
    reason: str = ""
    answer: dict[str, Any] | None = field(default=None, repr=False)
    image: int = -1


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _forged_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims ``width``×``height`` (Pillow refuses it as a bomb)."""
    real = _png(np.zeros((1, 1), np.uint8))
    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + real[24:29]
    return real[:12] + header + zlib.crc32(header).to_bytes(4, "big") + real[33:]


def hostile_probes(image: bytes, token: str) -> list[Probe]:
    """The hostile kinds (one each), with the token where they carry one; ``image`` is a good PNG. Under load
    any of them may also be refused with 429 before it is read (:data:`UNDER_LOAD`)."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    as_json = {"Content-Type": "application/json", **auth}
    b64 = base64.b64encode(image).decode()

    def body(**fields: Any) -> bytes:
        return json.dumps({"image": b64, **fields}).encode()

    tiff = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiff, format="TIFF")
    probes = [
        Probe("8000x8000 black PNG", _png(np.zeros((8000, 8000), np.uint8)), {"Content-Type": "image/png", **auth},
              (413,)),
        Probe("PNG over Pillow's guard", _forged_png(14000, 14000), {"Content-Type": "image/png", **auth}, (413,)),
        Probe("1000 classes x 99 synonyms", body(classes=[{"name": ",".join("a" * 99)}] * 1000), as_json, (400,)),
        Probe("min_score 10^320", body()[:-1] + b', "min_score": 1' + b"0" * 320 + b"}", as_json, (400,)),
        Probe("5000-digit integer", body()[:-1] + b', "min_score": ' + b"9" * 5000 + b"}", as_json, (400,)),
        Probe("100k nested [", b"[" * 100_000 + b"]" * 100_000, as_json, (400,)),
        Probe("min_score: 200k strings", body(min_score=["xxxx"] * 200_000), as_json, (400,)),
        Probe("min_score: true", body(min_score=True), as_json, (400,)),
        Probe("misspelt field", body(min_scor=0.5), as_json, (400,)),
        Probe("TIFF file", tiff.getvalue(), {"Content-Type": "image/tiff", **auth}, (415,)),
        Probe("40 MB chunked body", b"", {"Content-Type": "image/png", **auth}, (413,), chunked_mb=40),
    ]
    if token:
        probes += [Probe("no credentials", image, {"Content-Type": "image/png"}, (401,)),
                   Probe("wrong token", image, {"Content-Type": "image/png", "Authorization": "Bearer nope"},
                         (401,))]
    return probes


def good_probes(images: list[bytes], count: int, token: str) -> list[Probe]:
    headers = {"Content-Type": "image/png", **({"Authorization": f"Bearer {token}"} if token else {})}
    return [Probe("good", images[i % len(images)], headers, (200, 429), image=i % len(images))
            for i in range(count)]


def send(url: str, probe: Probe) -> Outcome:
    """Send one probe; the status (0: the connection broke without an answer) and the reason or answer."""
    start = time.perf_counter()
    if probe.chunked_mb:
        status, text = _send_chunked(url, probe)
    else:
        request = urllib.request.Request(url, data=probe.body, headers=probe.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        except (OSError, http.client.HTTPException) as err:
            status, text = 0, str(err).encode()
    seconds = time.perf_counter() - start
    try:
        payload = json.loads(text)
    except ValueError:
        payload = {"error": text[:300].decode("utf-8", "replace")}
    if status == 200 and isinstance(payload, dict) and "png" in payload:
        return Outcome(probe.kind, status, seconds, answer=payload, image=probe.image)
    reason = payload.get("error", "") if isinstance(payload, dict) else str(payload)
    return Outcome(probe.kind, status, seconds, str(reason), image=probe.image)


def _send_chunked(url: str, probe: Probe) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT_S)
    try:
        conn.putrequest("POST", parts.path or "/")
        for name, value in {**probe.headers, "Transfer-Encoding": "chunked"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        piece = b"\0" * (1 << 20)
        try:
            for _ in range(probe.chunked_mb):
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed early: read what it said
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as err:
        return 0, str(err).encode()
    finally:
        conn.close()


def run_mixed(url: str, probes: list[Probe], concurrency: int, seed: int = 0) -> list[Outcome]:
    """Send ``probes`` in a shuffled order from ``concurrency`` client threads at once."""
    order = list(probes)
    random.Random(seed).shuffle(order)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda probe: send(url, probe), order))


def summarize(outcomes: list[Outcome], probes: list[Probe], correct: Callable[[Outcome], bool]) -> dict[str, Any]:
    """Counts of a mixed run: good answered correctly / refused with 429 / otherwise, each hostile kind's
    statuses and whether they were the expected ones (or 429), 500s, the longest reason, p50/p95 of the good
    answers."""
    expected = {p.kind: (*p.expect, UNDER_LOAD) for p in probes}
    good = [o for o in outcomes if o.kind == "good"]
    answered = [o for o in good if o.status == 200]
    hostile: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        if o.kind != "good":
            entry = hostile.setdefault(o.kind, {"statuses": Counter(), "reason": o.reason[:80], "seconds": 0.0})
            entry["statuses"][o.status] += 1
            entry["seconds"] = max(entry["seconds"], o.seconds)
            entry["as_expected"] = all(s in expected[o.kind] for s in entry["statuses"])
    latencies = np.array([o.seconds for o in answered]) if answered else np.zeros(1)
    return {
        "sent": len(outcomes), "good_sent": len(good), "good_correct": sum(correct(o) for o in answered),
        "good_wrong": sum(not correct(o) for o in answered), "good_429": sum(o.status == 429 for o in good),
        "good_other": dict(Counter(o.status for o in good if o.status not in (200, 429))),
        "status_5xx": sum(o.status >= 500 for o in outcomes),
        "longest_reason": max((len(o.reason) for o in outcomes), default=0),
        "good_p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "good_p95_ms": 1000 * float(np.percentile(latencies, 95)),
        "hostile": {kind: {**e, "statuses": dict(e["statuses"])} for kind, e in hostile.items()},
    }
