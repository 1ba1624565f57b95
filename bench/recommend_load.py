"""Load test of GET /recommend on an ml-1m model at max_len 200, with /healthz beside it as the ceiling
of the HTTP stack. The server is uvicorn with one worker process, started as a subprocess; the load
generator is wrk when installed, else a lean asyncio HTTP/1.1 keep-alive client in this process.

    nice -n 10 .venv/bin/python bench/recommend_load.py --duration 60 --out docs/results/recommend_load.md

A random-init model costs exactly what a trained one costs per request (same shapes, same work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import machine  # noqa: E402
from models.backbone import SeqRecModel  # noqa: E402
from models.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402
from models.config import BackboneConfig  # noqa: E402


# --- the server under test ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, threads: int | None,
                 extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECMERGE_")}
    env.update(RECMERGE_DATA_DIR=str(data_dir), PYTHONPATH=str(REPO), **(extra or {}))
    if threads:
        env["RECMERGE_TORCH_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log"]
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=env, cwd=data_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
    raise SystemExit("server did not answer /healthz within 120 s")


def register_model(base: str, source: Path, work: Path, max_len: int) -> tuple[str, list[str], int]:
    """Upload ml-1m (the server prepares it) and a random-init checkpoint; alias it `production`."""
    with open(source, "rb") as f:
        r = httpx.post(f"{base}/datasets", data={"name": "ml-1m"}, files={"file": (source.name, f)}, timeout=600)
    r.raise_for_status()
    d = r.json()
    cfg = BackboneConfig(n_items=d["n_items"], max_len=max_len)
    ckpt = work / "random.safetensors"
    save_checkpoint(ckpt, SeqRecModel(cfg).state_dict(),
                    CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec", "init": "random"},
                                   dataset_fingerprint=d["fingerprint"], n_items=d["n_items"]))
    with open(ckpt, "rb") as f:
        r = httpx.post(f"{base}/recipes", data={"name": "random", "dataset_id": d["id"]},
                       files={"file": (ckpt.name, f)}, timeout=600)
    r.raise_for_status()
    httpx.put(f"{base}/aliases/production", json={"model_id": r.json()["id"]}).raise_for_status()
    users = sorted({line.split("\t", 1)[0] for line in source.read_text().splitlines()[1:]})
    return r.json()["id"], users, d["n_items"]


def server_batches(base: str) -> tuple[float, float]:
    """(forward passes, requests answered by them) so far, from /metrics."""
    text = httpx.get(f"{base}/metrics").text
    count = re.search(r"^recmerge_recommend_batch_size_count (\S+)$", text, re.M)
    total = re.search(r"^recmerge_recommend_batch_size_sum (\S+)$", text, re.M)
    return (float(count.group(1)) if count else 0.0), (float(total.group(1)) if total else 0.0)


# --- the lean load generator ----------------------------------------------------------------------
async def _connection(port: int, requests: list[bytes], deadline: float, lat: list[float], errors: list[str]):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = random.randrange(len(requests))
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            m = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(m.group(1)) if m else 0)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(str(status))
    except (OSError, asyncio.IncompleteReadError) as e:
        errors.append(type(e).__name__)
    finally:
        writer.close()


async def _load(port: int, requests: list[bytes], concurrency: int, duration: float):
    lat: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + duration
    t0 = time.perf_counter()
    await asyncio.gather(*(_connection(port, requests, deadline, lat, errors) for _ in range(concurrency)))
    return lat, errors, time.perf_counter() - t0


def python_load(port: int, paths: list[str], concurrency: int, duration: float) -> dict:
    requests = [f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for p in paths]
    lat, errors, elapsed = asyncio.run(_load(port, requests, concurrency, duration))
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "rps": len(lat) / elapsed, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "errors": len(errors)}


WRK_SCRIPT = """
paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
request = function() return wrk.format("GET", paths[math.random(#paths)]) end
"""


def wrk_load(port: int, paths: list[str], concurrency: int, duration: float, work: Path) -> dict:
    (work / "paths.txt").write_text("\n".join(paths) + "\n")
    (work / "paths.lua").write_text(WRK_SCRIPT % (work / "paths.txt"))
    out = subprocess.run(["wrk", "-t", str(min(2, concurrency)), "-c", str(concurrency), "-d", f"{duration:.0f}s",
                          "--latency", "-s", str(work / "paths.lua"), f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"requests": total, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": ms("50%"), "p99": ms("99%"),
            "errors": (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)}


# --- the run --------------------------------------------------------------------------------------
def run_setup(args, generator: str, setup: str, extra: dict[str, str], concurrency: list[int],
              with_health: bool) -> list[dict]:
    """Start a server with these extra settings, register the model, load it at each concurrency."""
    work = Path(tempfile.mkdtemp(prefix="recommend-load-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(work / "svc", port, args.torch_threads, extra)
    rows = []
    try:
        t = time.perf_counter()
        model_id, users, n_items = register_model(base, args.source, work, args.max_len)
        print(f"[{setup}] registered ml-1m ({len(users)} users, {n_items} items) and model {model_id} "
              f"in {time.perf_counter() - t:.0f} s; load generator: {generator}", flush=True)
        rng = random.Random(0)
        rec_paths = [f"/recommend/{u}?model=production&k={args.k}" for u in rng.sample(users, len(users))]
        assert httpx.get(base + rec_paths[0]).status_code == 200  # loads the model into the cache
        endpoints = ([("/healthz", ["/healthz"])] if with_health else []) + [("GET /recommend/{user}", rec_paths)]
        for name, paths in endpoints:
            for c in concurrency:
                before = server_batches(base)
                if generator == "wrk":
                    r = wrk_load(port, paths, c, args.duration, work)
                else:
                    r = python_load(port, paths, c, args.duration)
                after = server_batches(base)
                passes = after[0] - before[0]
                r.update(setup=setup, endpoint=name, concurrency=c,
                         batch=(after[1] - before[1]) / passes if passes else None,
                         load=os.getloadavg()[0])
                rows.append(r)
                print(json.dumps(r), flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "ml-1m" / "ml-1m.seq.tsv")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per (endpoint, concurrency)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--torch-threads", type=int, help="RECMERGE_TORCH_THREADS for the server")
    ap.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--baseline", default="RECMERGE_FORWARD=thread,RECMERGE_BATCH_PIPELINE=1",
                    help="server settings (K=V,...) of a second server measured in the same run, for comparison; "
                         "'' to skip (default: the earlier design, forward passes in a thread, one batch at a time)")
    ap.add_argument("--baseline-concurrency", type=int, nargs="+", default=[32])
    ap.add_argument("--out", type=Path, help="write the markdown report here")
    args = ap.parse_args()

    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    rows = []
    setups = [("default", {}, args.concurrency, True)]
    if args.baseline:
        setups.append((args.baseline, dict(kv.split("=", 1) for kv in args.baseline.split(",")),
                       args.baseline_concurrency, False))
    for setup, extra, concurrency, with_health in setups:
        rows += run_setup(args, generator, setup, extra, concurrency, with_health)
    report = render(rows, args, generator)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


def render(rows: list[dict], args, generator: str) -> str:
    lines = [
        "| server | endpoint | concurrency | requests/s | p50 ms | p99 ms | errors | requests | mean batch "
        "| load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        batch = f"{r['batch']:.1f}" if r["batch"] else "–"
        lines.append(f"| {r['setup']} | {r['endpoint']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50']:.1f} | "
                     f"{r['p99']:.1f} | "
                     f"{r['errors']} | {r['requests']} | {batch} | {r['load']:.1f} |")
    cmd = " ".join([".venv/bin/python bench/recommend_load.py", f"--duration {args.duration:g}",
                    *(["--out", str(args.out)] if args.out else [])])
    return "\n".join([
        "# GET /recommend under load",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {machine.line(with_torch=False)}. Server: uvicorn, 1 worker process, `--no-access-log`, "
        f"embedded settings "
        f"(SQLite, local store), torch threads {args.torch_threads or 'default (half the cores)'}. "
        f"Load generator: {generator} on the same machine, {args.duration:g} s per row, keep-alive connections.",
        "",
        f"Model: BERT4Rec backbone (hidden 64, 2 layers, 2 heads, max_len {args.max_len}), random init, on ml-1m "
        f"(6,040 users, 3,706 items) uploaded through POST /datasets and POST /recipes, served through the alias "
        f"`production`; each request is a random ml-1m user, k={args.k}, history = the user's whole sequence.",
        "'mean batch' = requests answered by one call of the micro-batcher (server's /metrics), which runs "
        "them as packed forward passes (models/packed.py) of up to RECMERGE_FORWARD_CHUNK histories; 'load avg' "
        "= 1-minute load average after the row (the machine is shared). 'default' = the shipped settings "
        "(forward passes in a child process, batches queued in its pipe, two batches out at once); the other "
        "server, started after it in the same run, differs only by the settings its name lists.",
        "",
        *lines,
        "",
    ])


if __name__ == "__main__":
    main()
