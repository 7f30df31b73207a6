"""On-storage layout of a cache and its commit protocol (pyarrow filesystems; local paths or s3://...).

A cache is a directory::

    cache.json                 kind (sam | clip), format version and the settings that produced it
    parts/part-<run>-<id>.parquet   committed rows, one file per processed batch of images
    errors/part-<run>-<id>.parquet  images that failed (stem, path, reason), same commit protocol
    _tmp/                      files being written; never read
    _SUCCESS                   JSON counts of the last run, written when it attempted every missing image
    _WRITER                    the run allowed to commit (a newer run takes it over)
    text.parquet               (clip caches) the class-name text embeddings

Commit protocol: a part is written completely under ``_tmp/`` and then moved into ``parts/`` (an atomic
rename on local and HDFS filesystems; on object stores the upload itself only becomes visible when
complete). Readers list ``parts/part-*.parquet`` only, so an interrupted write is never mistaken for a
finished one. Rows are keyed by image stem.

One writer at a time: a run takes the ``_WRITER`` lease when it starts, and a worker commits only while
its run holds it. A worker of a killed driver that lives on for a moment (Ray tears actors down
asynchronously) finds the lease taken by the rerun and discards its batch instead of committing a
second copy of an image. The lease check and the rename are not one atomic step, so every run ends by
dropping rows whose stem an earlier part already holds (:meth:`CacheStore.drop_duplicate_rows`), and
readers keep the first occurrence in part-name order as a last guard.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dearli.errors import ConfigError, DataError

FORMAT_VERSION = 1
MANIFEST = "cache.json"
PARTS_DIR = "parts"
ERRORS_DIR = "errors"
TMP_DIR = "_tmp"
SUCCESS = "_SUCCESS"
WRITER = "_WRITER"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"

ERROR_SCHEMA = pa.schema([("image_id", pa.string()), ("stem", pa.string()), ("image_path", pa.string()),
                          ("reason", pa.string()), ("run_id", pa.string())])


class StaleWriterError(RuntimeError):
    """A worker of a superseded run tried to commit."""


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it for a local path or a ``scheme://`` URI."""
    if "://" in str(uri):
        try:
            return pafs.FileSystem.from_uri(str(uri))
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(uri, f"cannot open this location: {err}") from err
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def new_run_id() -> str:
    """Sortable, unique id of one run (UTC time, then random): part names sort by run."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _list_parts(fs: pafs.FileSystem, folder: str) -> list[str]:
    info = fs.get_file_info(folder)
    if info.type == pafs.FileType.NotFound:
        return []
    files = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    names = [f.path for f in files if f.type == pafs.FileType.File
             and f.base_name.startswith(PART_PREFIX) and f.base_name.endswith(PART_SUFFIX)]
    return sorted(names)


def _write_json(fs: pafs.FileSystem, path: str, values: dict[str, Any]) -> None:
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(values, indent=2, sort_keys=True).encode())


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as src:
        try:
            return json.loads(src.read().decode())
        except ValueError as err:
            raise DataError(path, f"not valid JSON ({err})") from err


class CacheStore:
    """Writer-side access to one cache directory (also usable read-only: ``committed_stems``)."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self.fs, self.root = open_uri(uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def manifest(self) -> dict[str, Any] | None:
        return _read_json(self.fs, self.path(MANIFEST))

    def open_for_writing(self, kind: str, settings: dict[str, Any]) -> None:
        """Create the cache, or check that an existing one was made by the same kind and settings.

        Mixing settings would make the cache inexact (some images with one generator, some with another),
        so a mismatch is an error naming the differing keys.
        """
        existing = self.manifest()
        wanted = {"kind": kind, "format_version": FORMAT_VERSION, "settings": settings}
        if existing is None:
            if self.fs.get_file_info(self.root).type == pafs.FileType.File:
                raise DataError(self.uri, "is a file; a cache needs a directory")
            self.fs.create_dir(self.root, recursive=True)
            _write_json(self.fs, self.path(MANIFEST), wanted)
        else:
            wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as stored
            if existing.get("kind") != kind or existing.get("format_version") != FORMAT_VERSION:
                raise ConfigError(f"{self.uri}: holds a {existing.get('kind')!r} cache (format "
                                  f"{existing.get('format_version')}), not a {kind!r} cache (format {FORMAT_VERSION})")
            old = existing.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != wanted["settings"].get(k))
            if diff:
                raise ConfigError(f"{self.uri}: was made with different settings ({', '.join(diff)}); "
                                  "use a new output location or the original settings")
        self.fs.delete_dir_contents(self.path(TMP_DIR), missing_dir_ok=True)
        if self.has_success():  # the cache is being extended: no longer known to be complete
            self.fs.delete_file(self.path(SUCCESS))

    def take_lease(self, run_id: str) -> None:
        """Make ``run_id`` the only run whose workers may commit (earlier runs' workers are superseded)."""
        _write_json(self.fs, self.path(WRITER), {"run_id": run_id})

    def holds_lease(self, run_id: str) -> bool:
        lease = _read_json(self.fs, self.path(WRITER))
        return lease is None or lease.get("run_id") == run_id

    def has_success(self) -> bool:
        return self.fs.get_file_info(self.path(SUCCESS)).type == pafs.FileType.File

    def part_files(self, folder: str = PARTS_DIR) -> list[str]:
        return _list_parts(self.fs, self.path(folder))

    def committed_stems(self) -> set[str]:
        """Stems of every committed row (reads only the ``stem`` column)."""
        stems: set[str] = set()
        for path in self.part_files():
            stems.update(pq.read_table(path, columns=["stem"], filesystem=self.fs).column("stem").to_pylist())
        return stems

    def commit(self, table: pa.Table, run_id: str, folder: str = PARTS_DIR) -> str:
        """Write ``table`` under _tmp/, then move it into ``folder``; returns the committed path.

        The part name is derived from the run and the stems it holds: if a worker dies after committing
        and the executor retries its batch, the retry replaces the same part instead of adding a copy.
        """
        digest = hashlib.sha1("\n".join(table.column("stem").to_pylist()).encode()).hexdigest()[:16]
        name = f"{PART_PREFIX}{run_id}-{digest}{PART_SUFFIX}"
        tmp = self.path(TMP_DIR, name)
        final = self.path(folder, name)
        self.fs.create_dir(self.path(TMP_DIR), recursive=True)
        self.fs.create_dir(self.path(folder), recursive=True)
        pq.write_table(table, tmp, filesystem=self.fs)
        if not self.holds_lease(run_id):
            self.fs.delete_file(tmp)
            raise StaleWriterError(f"{self.uri}: run {run_id} was superseded by a newer run; batch discarded")
        self.fs.move(tmp, final)
        return final

    def drop_duplicate_rows(self) -> int:
        """Remove rows whose stem an earlier part (in name order) already holds; returns how many."""
        seen: set[str] = set()
        removed = 0
        for path in self.part_files():
            stems = pq.read_table(path, columns=["stem"], filesystem=self.fs).column("stem").to_pylist()
            keep = [stem not in seen for stem in stems]
            seen.update(stems)
            if all(keep):
                continue
            removed += keep.count(False)
            if not any(keep):
                self.fs.delete_file(path)
                continue
            table = pq.read_table(path, filesystem=self.fs).filter(pa.array(keep))
            tmp = self.path(TMP_DIR, path.rsplit("/", 1)[-1])
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, path)
        return removed

    def read_errors(self) -> pa.Table:
        """The latest error of every image that is still missing from the cache."""
        done = self.committed_stems()
        tables = [pq.read_table(p, filesystem=self.fs) for p in self.part_files(ERRORS_DIR)]
        if not tables:
            return ERROR_SCHEMA.empty_table()
        latest: dict[str, dict[str, Any]] = {}
        for row in pa.concat_tables(tables).to_pylist():  # parts are in run order: later rows win
            if row["stem"] not in done:
                latest[row["stem"]] = row
        return pa.Table.from_pylist(list(latest.values()), schema=ERROR_SCHEMA)

    def drop_retried_errors(self, run_id: str, attempted: set[str]) -> None:
        """Delete error parts of earlier runs whose every image was attempted again in ``run_id``."""
        for path in self.part_files(ERRORS_DIR):
            if f"{PART_PREFIX}{run_id}-" in path.rsplit("/", 1)[-1]:
                continue
            stems = pq.read_table(path, columns=["stem"], filesystem=self.fs).column("stem").to_pylist()
            if set(stems) <= attempted:
                self.fs.delete_file(path)

    def mark_success(self, summary: dict[str, Any]) -> None:
        _write_json(self.fs, self.path(SUCCESS), summary)
