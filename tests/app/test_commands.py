"""`recmerge serve` with no environment is the whole embedded service; `recmerge db upgrade` migrates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from tests.app.conftest import REPO, checkpoint_bytes, interactions_csv, multipart_stream
from tests.conftest_services import free_port_number, wait_for_port


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECMERGE_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _cli(*args, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_serve_embedded_with_no_environment(tmp_path):
    port = free_port_number()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"],
                            cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for_port(port, timeout=30)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/readyz").json()["database"] == "ok"
        assert (tmp_path / ".recmerge" / "recmerge.db").is_file()  # migrated at start, under the CWD
        d = httpx.post(f"{base}/datasets", data={"name": "t"}, files={"file": ("i.csv", interactions_csv())}).json()
        ck = checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"])
        m = httpx.post(f"{base}/recipes", data={"name": "m", "dataset_id": d["id"]},
                       files={"file": ("m.safetensors", ck)}).json()
        r = httpx.get(f"{base}/recommend/u2", params={"model": m["id"], "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        # The in-process job runner is there: a job route answers from the same database.
        assert httpx.get(f"{base}/jobs/nope").status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "embedded" in out and f":{port}" in out


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_upload_is_streamed_not_held_in_memory(tmp_path):
    port = free_port_number()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"],
                            cwd=tmp_path, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30)
        base = f"http://127.0.0.1:{port}"
        d = httpx.post(f"{base}/datasets", data={"name": "t"}, files={"file": ("i.csv", interactions_csv())}).json()
        before = _peak_rss_mb(proc.pid)
        size_mb = 256
        body, ctype = multipart_stream({"name": "big", "dataset_id": d["id"]}, "big.safetensors",
                                       (b"\0" * (1 << 20) for _ in range(size_mb)))
        r = httpx.post(f"{base}/recipes", content=body, headers={"content-type": ctype}, timeout=120)
        assert r.status_code == 400 and "not a safetensors file" in r.json()["detail"], r.text
        grew = _peak_rss_mb(proc.pid) - before
        assert grew < size_mb / 4, f"server peak memory grew by {grew:.0f} MB for a {size_mb} MB upload"
        assert not list((tmp_path / ".recmerge" / "tmp").iterdir())  # the scratch copy is gone
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


def test_db_upgrade_sqlite_and_postgres(tmp_path, postgres_url):
    r = _cli("db", "upgrade", cwd=tmp_path, env=_clean_env())
    assert r.returncode == 0 and "at revision 0001" in r.stdout, r.stderr
    assert (tmp_path / ".recmerge" / "recmerge.db").is_file()
    r = _cli("db", "upgrade", cwd=tmp_path, env=_clean_env(RECMERGE_DATABASE_URL=postgres_url))
    assert r.returncode == 0 and "postgresql" in r.stdout and "at revision 0001" in r.stdout, r.stderr
    r = _cli("db", "current", cwd=tmp_path, env=_clean_env(RECMERGE_DATABASE_URL=postgres_url))
    assert "at revision 0001" in r.stdout


def test_db_upgrade_unreachable_is_one_line(tmp_path):
    url = f"postgresql+psycopg2://postgres:hunter2@127.0.0.1:{free_port_number()}/x"
    r = _cli("db", "upgrade", cwd=tmp_path, env=_clean_env(RECMERGE_DATABASE_URL=url))
    assert r.returncode == 2
    assert r.stderr.startswith("recmerge db: error: cannot reach") and "Traceback" not in r.stderr
    assert "hunter2" not in r.stderr  # the password is not printed
