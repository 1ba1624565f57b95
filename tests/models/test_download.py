"""ml-100k download: GroupLens zip first (a local HTTP server in a thread, or a dead port), then the recbole
wheel through pip, configured for an index in a local directory (never the internet); the result is
cached and reused."""

from __future__ import annotations

import http.server
import io
import socket
import threading
import zipfile

import pytest

from models.data import prepare_dataset
from models.download import fetch_ml100k
from models.errors import DataError
from tests.offline_pip import build_wheel, pip_env, simple_index

# 4 users x 5 items: small, but enough for min_user=5 to keep every user.
ROWS = [(u, (u * 3 + k) % 7 + 1, 5, 1000 * u + k) for u in range(1, 5) for k in range(5)]
U_DATA = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS).encode()
U_ITEM = "".join(f"{i}|Movie {i} (199{i})|01-Jan-1995||url|0\n" for i in range(1, 8)).encode("latin-1")
INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS)).encode()
ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\n"
        + "".join(f"{i}\tMovie {i}\t199{i}\n" for i in range(1, 8))).encode()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return buf.getvalue()


class Server:
    """Serves a dict path -> bytes on 127.0.0.1 and counts the requests."""

    def __init__(self, routes: dict[str, bytes]):
        self.routes, self.hits = routes, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                body = outer.routes.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server({})
    yield s
    s.close()


@pytest.fixture
def dead_url():
    # A port that was free a moment ago: connecting to it is refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("RECMERGE_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.chdir(tmp_path)  # so "ml-100k" is not a local path


def test_grouplens_zip_is_fetched_cached_and_prepared(tmp_path, server, monkeypatch):
    server.routes["/ml-100k.zip"] = zip_bytes({"ml-100k/u.data": U_DATA, "ml-100k/u.item": U_ITEM,
                                               "ml-100k/README": b"x"})
    monkeypatch.setenv("RECMERGE_ML100K_URL", server.url + "/ml-100k.zip")
    ds = prepare_dataset("ml-100k", tmp_path / "out")
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (4, 7, 20)
    assert ds.titles["3"] == "Movie 3 (1993)"
    cached = tmp_path / "cache" / "recmerge" / "ml-100k"
    assert (cached / "u.data").read_bytes() == U_DATA
    assert server.hits == ["/ml-100k.zip"]
    # Second use comes from the cache: no new request.
    assert fetch_ml100k() == cached
    assert server.hits == ["/ml-100k.zip"]
    assert sorted(p.name for p in cached.parent.iterdir()) == ["ml-100k"]  # no temp dirs left


def test_wheel_fallback_through_pip_when_grouplens_is_down(tmp_path, dead_url, monkeypatch):
    """GroupLens refuses; pip, configured only for an index in a local directory, fetches the wheel."""
    wheel = build_wheel(tmp_path / "built", {"recbole/__init__.py": b"",
                                             "recbole/dataset_example/ml-100k/ml-100k.inter": INTER,
                                             "recbole/dataset_example/ml-100k/ml-100k.item": ITEM})
    for k, v in pip_env(tmp_path, simple_index(tmp_path / "index", wheel)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RECMERGE_ML100K_URL", dead_url)
    ds = prepare_dataset("ml-100k", tmp_path / "out")
    assert ds.meta["format"] == "recbole"
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (4, 7, 20)
    assert ds.titles["5"] == "Movie 5"
    cached = tmp_path / "cache" / "recmerge" / "ml-100k"
    assert (cached / "ORIGIN").read_text() == "pip download recbole==1.2.1\n"
    assert sorted(p.name for p in cached.iterdir()) == ["ORIGIN", "ml-100k.inter", "ml-100k.item"]  # no wheel kept
    # The same ratings through either source give the same prepared content.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "u.data").write_bytes(U_DATA)
    assert prepare_dataset(plain, tmp_path / "out2").fingerprint == ds.fingerprint


def test_pip_arguments_from_the_environment_reach_pip(tmp_path, dead_url, monkeypatch):
    wheels = tmp_path / "wheels"
    build_wheel(wheels, {"recbole/dataset_example/ml-100k/ml-100k.inter": INTER})
    for k, v in pip_env(tmp_path, None).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RECMERGE_ML100K_URL", dead_url)
    monkeypatch.setenv("RECMERGE_PIP_ARGS", f"--find-links {wheels}")
    assert (fetch_ml100k() / "ml-100k.inter").read_bytes() == INTER


def test_wheel_without_the_data_is_refused(tmp_path, dead_url, monkeypatch):
    wheel = build_wheel(tmp_path / "built", {"recbole/__init__.py": b""})
    for k, v in pip_env(tmp_path, simple_index(tmp_path / "index", wheel)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RECMERGE_ML100K_URL", dead_url)
    with pytest.raises(DataError, match=r"recbole-1\.2\.1-py3-none-any\.whl: the wheel holds no .*ml-100k\.inter"):
        fetch_ml100k()
    assert not (tmp_path / "cache" / "recmerge" / "ml-100k").exists()


def test_both_sources_failing_is_one_clear_error(tmp_path, dead_url, monkeypatch):
    for k, v in pip_env(tmp_path, None).items():  # no index, no wheels: pip finds nothing
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RECMERGE_ML100K_URL", dead_url)
    with pytest.raises(DataError) as err:
        fetch_ml100k()
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("could not download ml-100k: GroupLens (" + dead_url)
    assert "pip download (recbole==1.2.1): pip download recbole==1.2.1 failed (exit 1): ERROR: " in msg
    assert not (tmp_path / "cache" / "recmerge" / "ml-100k").exists()


def test_zip_without_u_data_falls_through(tmp_path, server, monkeypatch):
    server.routes["/ml-100k.zip"] = zip_bytes({"ml-100k/README": b"nothing here"})
    monkeypatch.setenv("RECMERGE_ML100K_URL", server.url + "/ml-100k.zip")
    for k, v in pip_env(tmp_path, None).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DataError, match=r"ml-100k\.zip\): .*the archive holds no u\.data"):
        fetch_ml100k()
