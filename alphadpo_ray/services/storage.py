"""Run storage: local paths, NFS, or object-store URIs (s3://, gs://), through `pyarrow.fs` as Ray does.

Small helpers used for what several runs share under ``ray.storage_path``: the prepared (tokenised)
data and the reference log-prob cache. Writes go to a temporary name first and are then moved into
place, so a reader never sees half a file and an interrupted writer leaves nothing behind that
looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def default_cache_dir() -> Path:
    """The project's cache on this machine (built-in task, SQLite store template, JIT extensions):
    ALPHADPO_RAY_CACHE, else ~/.cache/alphadpo-ray."""
    import os

    return Path(os.environ.get("ALPHADPO_RAY_CACHE", Path.home() / ".cache" / "alphadpo-ray"))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or URI."""
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)


def join(base: str, *parts: str) -> str:
    """`base`/`parts`; a URI's query (pyarrow's options, ``s3://bucket/x?endpoint_override=…``) stays last."""
    path, question, query = base.partition("?") if "://" in base else (base, "", "")
    return posixpath.join(path, *parts) + question + query


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _atomic_write(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def write_json(uri: str, payload: dict) -> None:
    _atomic_write(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def write_table(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _atomic_write(uri, buffer.getvalue())


def read_table(uri: str) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs)


def copy_dir(src_uri: str, dst_local: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Copy a folder from storage to a local directory; `src_uri` is a path on `filesystem` when given."""
    fs, path = (filesystem, src_uri) if filesystem is not None else resolve(src_uri)
    Path(dst_local).mkdir(parents=True, exist_ok=True)  # pyarrow creates the subfolders, not this one
    pafs.copy_files(path, dst_local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def is_dir(path: str, filesystem: pafs.FileSystem) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.Directory


def uri_of(path: str, filesystem: pafs.FileSystem) -> str:
    """The URI of `path` on `filesystem` — Ray gives a checkpoint as (filesystem, path), the path of an
    object store without its scheme (``bucket/run/checkpoint_…``), which names nothing on its own."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    scheme = {"gcs": "gs"}.get(filesystem.type_name, filesystem.type_name)
    return f"{scheme}://{path}"


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive advisory lock on a local (or NFS) file, created if missing; released on exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
