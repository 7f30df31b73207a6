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

Single files (``cache.json``, ``_WRITER``, ``_SUCCESS``) are replaced whole by :func:`write_atomic`: a
temporary file beside the target, then a rename. A write that fails (disk full, read-only) raises
:class:`~dearli.errors.OutputError`, which stops a job instead of counting an image as failed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dearli.errors import ConfigError, DataError, DearliError, OutputError

FORMAT_VERSION = 1
MANIFEST = "cache.json"
PARTS_DIR = "parts"
ERRORS_DIR = "errors"
TMP_DIR = "_tmp"
SUCCESS = "_SUCCESS"
WRITER = "_WRITER"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
COMPACT_BYTES = 64 * 2**20  # merged parts grow to about this: few files to list and open, bounded memory
TMP_MARK = ".tmp-"  # write_atomic's temporary files: .<name>.tmp-<random>, beside their target

ERROR_SCHEMA = pa.schema([("image_id", pa.string()), ("stem", pa.string()), ("image_path", pa.string()),
                          ("reason", pa.string()), ("run_id", pa.string())])


class StaleWriterError(DearliError):
    """A worker or driver of a superseded run tried to change the output."""


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


def output_error(path: str, err: OSError) -> OutputError:
    """The one-line error of an output that could not be written, naming ``path`` and the errno."""
    code = err.errno
    if code:
        detail = f"errno {code} {errno.errorcode.get(code, '')}: {os.strerror(code)}"
    else:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    what = "the output disk is full" if code in (errno.ENOSPC, errno.EDQUOT) else "the output is not writable"
    return OutputError(path, f"cannot write ({detail}): {what}; the work already committed is kept, "
                             "free space (or fix the location) and rerun to finish")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn an OSError raised while changing ``path`` into :func:`output_error`."""
    try:
        yield
    except OSError as err:
        raise output_error(path, err) from err


def _chunks(data: bytes | Iterable[bytes]) -> Iterable[bytes]:
    return (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data


def _write_file(path: str, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or chunks of them) to a new local file, flushed to disk (the rename that
    follows publishes it whole)."""
    with open(path, "wb") as out:
        for chunk in _chunks(data):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def write_atomic(path: str | Path, data: bytes | Iterable[bytes], fs: pafs.FileSystem | None = None) -> None:
    """Replace ``path`` (local when ``fs`` is None) by ``data`` through a temporary file beside it and a rename.
    ``data`` may come in chunks (an iterable of bytes), so that a large file is never whole in memory.

    Readers see the old file or the new one, never part of one. A failed write raises OutputError and
    leaves nothing; a killed one leaves a temporary file that :func:`remove_temporaries` deletes.
    """
    path = str(path)
    local = fs is None or isinstance(fs, pafs.LocalFileSystem)
    folder, name = os.path.split(path) if local else path.rsplit("/", 1)
    tmp = path[: len(path) - len(name)] + f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        if local:
            os.makedirs(folder or ".", exist_ok=True)
            _write_file(tmp, data)
            os.replace(tmp, path)
        else:
            fs.create_dir(folder, recursive=True)
            with fs.open_output_stream(tmp) as out:
                for chunk in _chunks(data):
                    out.write(chunk)
            fs.move(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            if local:
                os.remove(tmp)
            else:
                fs.delete_file(tmp)
        raise output_error(path, err) from err


def is_temporary(name: str) -> bool:
    """Whether a file name is one of write_atomic's temporary files."""
    return name.startswith(".") and TMP_MARK in name


def remove_temporaries(folder: str | Path, fs: pafs.FileSystem | None = None) -> int:
    """Delete the temporary files killed writers left in ``folder`` (not below it); returns how many."""
    fs = fs or pafs.LocalFileSystem()
    infos = fs.get_file_info(pafs.FileSelector(str(folder), allow_not_found=True))
    stale = [i.path for i in infos if i.type == pafs.FileType.File and is_temporary(i.base_name)]
    for path in stale:
        with writing(path):
            fs.delete_file(path)
    return len(stale)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the contents of a Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_json(fs: pafs.FileSystem, path: str, values: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(values, indent=2, sort_keys=True).encode(), fs)


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
            with writing(self.root):
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
        with writing(self.path(TMP_DIR)):
            self.fs.delete_dir_contents(self.path(TMP_DIR), missing_dir_ok=True)
        for folder in (self.root, self.path(PARTS_DIR), self.path(ERRORS_DIR)):
            remove_temporaries(folder, self.fs)
        self.clear_success()  # the cache is being extended: no longer known to be complete

    def take_lease(self, run_id: str) -> None:
        """Make ``run_id`` the only run whose workers may commit (earlier runs' workers are superseded)."""
        _write_json(self.fs, self.path(WRITER), {"run_id": run_id})

    def holds_lease(self, run_id: str) -> bool:
        lease = _read_json(self.fs, self.path(WRITER))
        return lease is None or lease.get("run_id") == run_id

    def require_lease(self, run_id: str) -> None:
        """StaleWriterError unless ``run_id`` still holds the writer lease."""
        if not self.holds_lease(run_id):
            raise StaleWriterError(f"{self.uri}: another run took over the output (run {run_id} was superseded); "
                                   "this run stops without changing it")

    def clear_success(self) -> None:
        if self.has_success():
            with writing(self.path(SUCCESS)):
                self.fs.delete_file(self.path(SUCCESS))

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
        with writing(tmp):
            self.fs.create_dir(self.path(TMP_DIR), recursive=True)
            self.fs.create_dir(self.path(folder), recursive=True)
            pq.write_table(table, tmp, filesystem=self.fs)
        try:
            self.require_lease(run_id)
        except StaleWriterError:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise
        try:
            self.fs.move(tmp, final)
        except OSError as err:
            self.require_lease(run_id)  # a newer run that cleared _tmp/ owns the output
            raise output_error(final, err) from err
        return final

    def _filter_rows(self, keep_row: Callable[[str], bool]) -> int:
        """Rewrite the parts (in name order) without the rows ``keep_row(stem)`` rejects; returns how many went."""
        removed = 0
        for path in self.part_files():
            stems = pq.read_table(path, columns=["stem"], filesystem=self.fs).column("stem").to_pylist()
            keep = [keep_row(stem) for stem in stems]
            if all(keep):
                continue
            removed += keep.count(False)
            if not any(keep):
                with writing(path):
                    self.fs.delete_file(path)
                continue
            table = pq.read_table(path, filesystem=self.fs).filter(pa.array(keep))
            write_atomic(path, parquet_bytes(table), self.fs)
        return removed

    def drop_duplicate_rows(self) -> int:
        """Remove rows whose stem an earlier part (in name order) already holds; returns how many."""
        seen: set[str] = set()

        def first(stem: str) -> bool:
            new = stem not in seen
            seen.add(stem)
            return new

        return self._filter_rows(first)

    def drop_rows(self, stems: set[str]) -> int:
        """Uncommit the rows of ``stems`` (a rerun processes those images again); returns how many went."""
        return self._filter_rows(lambda stem: stem not in stems)

    def compact(self, run_id: str, target_bytes: int = COMPACT_BYTES) -> int:
        """Merge runs of small committed parts (in name order) into parts of about ``target_bytes``.

        Workers commit a few images a part, so that a crash loses little; a finished cache of 10⁵ images
        would otherwise be 10⁴ files for every reader to list and open (Ray Data's first batch waits for all
        of them). Each merged part is committed (``_tmp/``, then a rename) before its sources are deleted:
        a crash in between leaves two copies of some rows, and readers keep the first. Returns how many
        fewer part files there are.
        """
        paths = self.part_files()
        sizes = [info.size for info in self.fs.get_file_info(paths)]
        groups: list[list[str]] = [[]]
        total = 0
        for path, size in zip(paths, sizes):
            if groups[-1] and total + size > target_bytes:
                groups.append([])
                total = 0
            groups[-1].append(path)
            total += size
        removed = 0
        for group in (g for g in groups if len(g) > 1):
            merged = pa.concat_tables([pq.read_table(p, filesystem=self.fs) for p in group])
            final = self.commit(merged, run_id)
            removed -= 1
            for path in group:
                if path != final:
                    with writing(path):
                        self.fs.delete_file(path)
                    removed += 1
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
                with writing(path):
                    self.fs.delete_file(path)

    def mark_success(self, summary: dict[str, Any]) -> None:
        _write_json(self.fs, self.path(SUCCESS), summary)
