"""Unit tests of `services/storage.py` on the local file system (pyarrow's LocalFileSystem, real files):
path/URI resolution and joins, atomic writes, Parquet round trips, folder copies, URIs of Ray's
(filesystem, path) pairs, and the advisory file lock. Object-store behaviour runs in test_object_storage.py."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from alphadpo_ray.services import storage


def test_default_cache_dir_falls_back_to_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("ALPHADPO_RAY_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.default_cache_dir() == tmp_path / ".cache" / "alphadpo-ray"
    monkeypatch.setenv("ALPHADPO_RAY_CACHE", str(tmp_path / "mine"))
    assert storage.default_cache_dir() == tmp_path / "mine"


def test_resolve_gives_the_local_file_system_for_paths_and_file_uris(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    fs, path = storage.resolve(f"file://{tmp_path}/b")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/b"


def test_join_keeps_a_uri_query_last_and_a_local_question_mark_in_the_path():
    assert storage.join("/data/runs", "prepared", "t.parquet") == "/data/runs/prepared/t.parquet"
    assert storage.join("s3://bucket/runs") == "s3://bucket/runs"
    assert (storage.join("s3://bucket/runs?endpoint_override=http://127.0.0.1:9000&scheme=http", "a", "b.json")
            == "s3://bucket/runs/a/b.json?endpoint_override=http://127.0.0.1:9000&scheme=http")
    assert storage.join("gs://bucket", "x") == "gs://bucket/x"
    # a local path is a path: a "?" in a folder's name is part of it, not a query
    assert storage.join("/tmp/what?now", "c") == "/tmp/what?now/c"


def test_write_json_creates_folders_sorts_keys_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "er" / "run.json"
    storage.write_json(str(target), {"b": 1, "a": Path("/x"), "c": {"z": 2, "y": 3}})
    text = target.read_text()
    assert json.loads(text) == {"a": "/x", "b": 1, "c": {"y": 3, "z": 2}}
    assert text.index('"a"') < text.index('"b"') < text.index('"c"') and '\n  "a": "/x"' in text
    storage.write_json(str(target), {"new": True})  # replaced whole
    assert json.loads(target.read_text()) == {"new": True}
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]


def test_write_table_and_read_table_round_trip_and_exists(tmp_path):
    uri = str(tmp_path / "prepared" / "train.parquet")
    assert not storage.exists(uri)
    table = pa.table({"row": [0, 1, 2], "prompt_ids": [[1, 2], [3], []]})
    storage.write_table(uri, table)
    assert storage.exists(uri) and storage.exists(str(tmp_path / "prepared"))
    assert storage.read_table(uri).equals(table)
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == ["train.parquet"]


def test_copy_dir_copies_nested_files_into_a_new_folder(tmp_path):
    src = tmp_path / "ckpt" / "policy"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"\x00\x01")
    (src / "sub" / "tokenizer.json").write_text("{}")
    storage.copy_dir(str(src), str(tmp_path / "out" / "policy"))
    assert (tmp_path / "out" / "policy" / "model.safetensors").read_bytes() == b"\x00\x01"
    assert (tmp_path / "out" / "policy" / "sub" / "tokenizer.json").read_text() == "{}"
    # with a filesystem given, the source is a path on it
    storage.copy_dir(str(src), str(tmp_path / "again"), pafs.LocalFileSystem())
    assert sorted(str(p.relative_to(tmp_path / "again")) for p in (tmp_path / "again").rglob("*")) == [
        "model.safetensors", "sub", "sub/tokenizer.json"]


def test_is_dir_tells_folders_from_files_and_missing_paths(tmp_path):
    local = pafs.LocalFileSystem()
    (tmp_path / "f").write_text("x")
    assert storage.is_dir(str(tmp_path), local)
    assert not storage.is_dir(str(tmp_path / "f"), local)
    assert not storage.is_dir(str(tmp_path / "missing"), local)


def test_uri_of_names_the_scheme_of_an_object_store():
    assert storage.uri_of("/runs/r/checkpoint_1", pafs.LocalFileSystem()) == "/runs/r/checkpoint_1"
    s3 = pafs.S3FileSystem(anonymous=True, region="us-east-1")
    assert storage.uri_of("bucket/run/checkpoint_2", s3) == "s3://bucket/run/checkpoint_2"
    gcs = pafs.GcsFileSystem(anonymous=True)
    assert storage.uri_of("bucket/run/checkpoint_3", gcs) == "gs://bucket/run/checkpoint_3"


def _try_lock(path: Path) -> bool:
    """Whether a second open file description gets the lock now (flock locks are per open file)."""
    with open(path, "a+") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(other, fcntl.LOCK_UN)
        return True


def test_file_lock_is_exclusive_while_held_and_released_on_exit_or_error(tmp_path):
    lock = tmp_path / "locks" / "sweep.lock"
    with storage.file_lock(lock):
        assert lock.is_file()  # created, with its folder
        assert not _try_lock(lock)
    assert _try_lock(lock)
    with pytest.raises(RuntimeError, match="inside"):
        with storage.file_lock(str(lock)):
            raise RuntimeError("inside")
    assert _try_lock(lock)
