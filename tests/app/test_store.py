"""The artifact store contract, on both backends: a local directory and S3 (moto's server on loopback)."""

from __future__ import annotations

import hashlib
import threading

import pytest

from core.store import LocalStore, S3Store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_store("s3://recmerge-test/some/prefix", tmp_path / "cache", endpoint_url=endpoint)


def _file(tmp_path, name: str, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return p


def test_put_file_is_content_addressed_and_idempotent(store, tmp_path):
    content = b"weights" * 1000
    sha = hashlib.sha256(content).hexdigest()
    assert not store.exists(sha)
    assert store.put_file(_file(tmp_path, "a.bin", content)) == sha
    assert store.put_file(_file(tmp_path, "b.bin", content), sha) == sha  # same content, stored once
    assert store.exists(sha) and list(store.objects()) == [sha]
    assert store.path_for(sha).read_bytes() == content
    with store.open(sha) as f:
        assert f.read() == content
    assert store.size(sha) == len(content)
    store.delete(sha)
    assert not store.exists(sha) and list(store.objects()) == []
    with pytest.raises(KeyError):
        store.path_for(sha)


def test_dirs_by_key(store, tmp_path):
    src = tmp_path / "prepared"
    (src / "sub").mkdir(parents=True)
    (src / "meta.json").write_text("{}")
    (src / "sub" / "x.bin").write_bytes(b"123")
    assert not store.has_dir("fp1")
    with pytest.raises(KeyError):
        store.get_dir("fp1")
    store.put_dir("fp1", src)
    store.put_dir("fp1", src)  # idempotent
    got = store.get_dir("fp1")
    assert (got / "meta.json").read_text() == "{}" and (got / "sub" / "x.bin").read_bytes() == b"123"
    assert list(store.dirs()) == ["fp1"]
    store.delete_dir("fp1")
    assert not store.has_dir("fp1")


def test_keys_cannot_escape_the_store(store):
    for bad in ("../../etc/passwd", "A" * 64, "abc"):
        with pytest.raises(ValueError):
            store.exists(bad)
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            store.has_dir(bad)


def test_local_put_is_atomic_under_concurrency(tmp_path):
    store = LocalStore(tmp_path / "store")
    content = b"x" * (3 << 20)
    src = _file(tmp_path, "big.bin", content)
    threads = [threading.Thread(target=store.put_file, args=(src,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() == content  # no temp file left behind


def test_s3_reads_through_a_verified_cache(s3_endpoint, tmp_path):
    writer = open_store("s3://recmerge-test/p", tmp_path / "cache-a", endpoint_url=s3_endpoint)
    reader = open_store("s3://recmerge-test/p", tmp_path / "cache-b", endpoint_url=s3_endpoint)
    assert isinstance(reader, S3Store)
    sha = writer.put_file(_file(tmp_path, "m.safetensors", b"model bytes"))
    local = reader.path_for(sha)  # a worker on another machine fetches into its own cache
    assert local.is_relative_to(tmp_path / "cache-b") and local.read_bytes() == b"model bytes"
    # A directory without its completion marker (a writer died mid-upload) does not exist.
    writer.s3.put_object(Bucket="recmerge-test", Key="p/dirs/half/meta.json", Body=b"{}")
    assert not reader.has_dir("half") and "half" not in list(reader.dirs())


def test_store_url_schemes(tmp_path):
    assert isinstance(open_store(f"file://{tmp_path}/s", tmp_path), LocalStore)
    with pytest.raises(ValueError, match="unknown scheme"):
        open_store("ftp://x/y", tmp_path)
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///prefix", tmp_path)
