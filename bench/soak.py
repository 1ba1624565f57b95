"""Soak: minutes of mixed traffic against the embedded and the Celery deployments, then a look at what grew,
what was lost and what was left over.

    nice -n 10 .venv/bin/python bench/soak.py --minutes 10 --rps 300 --out docs/results/soak.md

Each deployment runs alone, one after the other, on loopback:
- embedded: `recmerge serve` with no RECMERGE_* variable at all, in a temporary working directory (SQLite,
  ./.recmerge store, jobs on the API process's own runner); nothing is killed.
- celery: the same `recmerge serve` with a fresh PostgreSQL database, a private redis-server and one
  `celery -A workers.celery_app worker -Q gpu --concurrency 1` (docker-compose.yml's command), SIGKILLed with
  its pool every minute and started again; the service's own sweeper must finish what the kills interrupted.

Traffic: GET /recommend/{user}?model=production at a fixed rate (open loop: each request has its scheduled
send time and its latency counts from then, so a stalled server shows up as latency, not as a slower
client), recipe uploads, merge jobs (uniform over two recipes, Fisher over three fresh ones) and switches of
the `production` alias. The first minute is the warm-up: process RSS and open files are read at its end and
again when traffic stops. After traffic the script waits for every job to end, then counts rows, store
files, scratch directories and the broker's queue and unacked set against what it submitted.
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
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import machine  # noqa: E402

BIN = Path(sys.executable).parent
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"
QUEUE = "gpu"
SHAPE = {"hidden": 32, "layers": 2, "heads": 2, "inner": 64, "max_len": 50}
FISHER = {"sampling": "model", "n": 2, "max_users": 100}
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout} s")


# --- processes --------------------------------------------------------------------------------------
class Service:
    """A process in its own group, so a kill takes its children (Celery's pool, the forward process) too."""

    def __init__(self, role: str, argv: list[str], env: dict, cwd: Path, log: Path):
        self.role, self.log = role, log
        self._out = open(log, "ab")
        self.p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=30)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> None:
        """The signal goes to the main process alone, as a supervisor's would: it stops its children itself."""
        if self.alive():
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        # Stray group members (a pool child whose parent went first) go with the group.
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._out.close()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    if "resource_tracker" in text:
        return "python (multiprocessing resource tracker)"
    if "spawn_main" in text:
        return "python (multiprocessing spawn child: the forward process)"
    return re.sub(r"\S*/", "", text)[:60]


def proc_stats(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None
    return {"pid": pid, "rss_mib": rss / 1024, "fds": fds, "cmd": _cmdline(pid)}


def tree(role: str, pid: int) -> list[dict]:
    """The process and its descendants, depth first; each named by its role and its place in the tree, so
    a restarted worker's processes line up with the ones they replaced."""
    kids = _children()
    out = []

    def walk(p: int, label: str):
        s = proc_stats(p)
        if s is None:
            return
        out.append({**s, "role": label})
        for i, c in enumerate(sorted(kids.get(p, []))):
            walk(c, f"{label} › child {i + 1}")

    walk(pid, role)
    return out


# --- the synthetic dataset and checkpoints ------------------------------------------------------------
def write_interactions(path: Path, n_users: int, n_items: int, seed: int = 0) -> list[str]:
    """Noisy walks around a ring of items (so a model has something to learn); every item occurs."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(n_users):
        length = int(rng.integers(8, 61))
        start = (u * 8) % n_items if u * 8 < n_items else int(rng.integers(0, n_items))
        walk = (start + np.arange(length)) % n_items + 1
        flip = rng.random(length) < 0.1
        walk[flip] = rng.integers(1, n_items + 1, size=int(flip.sum()))
        lines.extend(f"{u + 1} {i}" for i in walk)
    path.write_text("\n".join(lines) + "\n")
    return [str(u + 1) for u in range(n_users)]


def make_checkpoints(out: Path, n: int, n_items: int, fingerprint: str) -> list[Path]:
    """Randomly initialised recipes: a merge or a forward pass costs the same as with trained ones."""
    import torch

    from models.backbone import SeqRecModel
    from models.checkpoint import CheckpointMeta, save_checkpoint
    from models.config import BackboneConfig

    cfg = BackboneConfig(n_items=n_items, **SHAPE)
    paths = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        p = out / f"recipe-{i:03d}.safetensors"
        save_checkpoint(p, SeqRecModel(cfg).state_dict(),
                        CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec"}, dataset_fingerprint=fingerprint,
                                       n_items=n_items))
        paths.append(p)
    return paths


# --- the open-loop recommend client -------------------------------------------------------------------
class Pool:
    """Keep-alive HTTP/1.1 connections for GET requests: a request takes the most recently used idle one or
    opens another. Idle ones are let go before uvicorn's keep-alive timeout (5 s) closes them under us."""

    IDLE_S = 3.0

    def __init__(self, port: int, limit: int):
        self.port, self.limit = port, limit
        self.idle: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.open = 0
        self.freed = asyncio.Condition()

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """(reader, writer, reused)"""
        loop = asyncio.get_running_loop()
        async with self.freed:
            while self.idle and loop.time() - self.idle[0][0] > self.IDLE_S:
                self.idle.pop(0)[2].close()
                self.open -= 1
            while not self.idle and self.open >= self.limit:
                await self.freed.wait()
            if self.idle:
                _, reader, writer = self.idle.pop()
                return reader, writer, True
            self.open += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except BaseException:
            await self.drop(None)
            raise
        return reader, writer, False

    async def put(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
        async with self.freed:
            self.idle.append((asyncio.get_running_loop().time(), reader, writer))
            self.freed.notify()

    async def drop(self, writer: asyncio.StreamWriter | None) -> None:
        if writer is not None:
            writer.close()
        async with self.freed:
            self.open -= 1
            self.freed.notify()

    def close(self) -> None:
        for _, _, w in self.idle:
            w.close()


@dataclass
class Recorded:
    scheduled: list[float] = field(default_factory=list)  # seconds since traffic start
    latency: list[float] = field(default_factory=list)  # seconds from the scheduled send time
    ok: list[bool] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


async def _exchange(pool: Pool, request: bytes) -> str | None:
    """One request on a pooled connection; None when answered 200, else what went wrong. A reused connection
    that the server closed before it read the request (no byte of an answer) is retried once on a new one, as
    HTTP clients do for idempotent requests; that is not counted as an error."""
    for _ in range(2):
        reader, writer, reused = await pool.get()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
        except BaseException as e:  # a timeout's cancellation too: the connection goes either way
            await pool.drop(writer)
            stale = isinstance(e, OSError) or (isinstance(e, asyncio.IncompleteReadError) and not e.partial)
            if reused and stale:
                continue
            raise
        try:
            status = int(head[9:12])
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            await reader.readexactly(int(m.group(1)) if m else 0)
        except BaseException:
            await pool.drop(writer)
            raise
        if re.search(rb"(?i)\r\nconnection: *close", head):
            await pool.drop(writer)
        else:
            await pool.put(writer, reader)
        return None if status == 200 else f"HTTP {status}"
    return "connection closed twice before an answer"


async def one_get(pool: Pool, request: bytes, t_sched: float, t0: float, rec: Recorded, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            kind = await _exchange(pool, request)
    except TimeoutError:
        kind = f"timeout {timeout:g} s"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        kind = type(e).__name__
    rec.scheduled.append(t_sched - t0)
    rec.latency.append(loop.time() - t_sched)
    rec.ok.append(kind is None)
    if kind:
        rec.errors[kind] += 1


async def recommend_traffic(port: int, users: list[str], rps: float, t0: float, duration: float, rec: Recorded,
                            k: int = 10, timeout: float = 10.0) -> int:
    loop = asyncio.get_running_loop()
    pool = Pool(port, limit=256)
    rng = random.Random(0)
    requests = [f"GET /recommend/{u}?model=production&k={k} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
                for u in users]
    tasks = set()
    i = 0
    while True:
        t = t0 + i / rps
        if t >= t0 + duration:
            break
        delay = t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one_get(pool, rng.choice(requests), t, t0, rec, timeout))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.gather(*tasks)
    pool.close()
    return i


# --- the other traffic --------------------------------------------------------------------------------
@dataclass
class Ops:
    uploads: list[str] = field(default_factory=list)  # model ids
    merges: list[dict] = field(default_factory=list)  # {"id", "method", "model_ids", "children"}
    alias_switches: int = 0
    kills: list[dict] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)


class Traffic:
    """Uploads, merges, alias switches (and kills) on a fixed timetable beside the recommend stream."""

    def __init__(self, base: str, dataset_id: str, checkpoints: list[Path], seeds: list[str], ops: Ops,
                 t0: float, duration: float, worker=None, fisher: dict | None = None, kill_wait: float = 20.0):
        self.fisher = fisher or FISHER
        self.kill_wait = kill_wait
        self.base, self.dataset_id, self.ops, self.t0, self.duration = base, dataset_id, ops, t0, duration
        self.checkpoints = list(checkpoints)
        self.recipes = list(seeds)  # every recipe model id, oldest first
        self.fisher_used: set[str] = {*seeds}  # a Fisher merge takes recipes no Fisher was estimated for
        self.pairs: set[frozenset] = set()
        self.servable = list(seeds)
        self.worker = worker

    def _fail(self, what: str, r: httpx.Response | Exception) -> None:
        kind = f"{what}: HTTP {r.status_code}" if isinstance(r, httpx.Response) else f"{what}: {type(r).__name__}"
        self.ops.errors[kind] += 1
        self.ops.log.append(f"{kind}: {r.text[:300] if isinstance(r, httpx.Response) else r}")

    async def every(self, period: float, offset: float, action) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            t = self.t0 + offset + n * period
            if t >= self.t0 + self.duration:
                return
            await asyncio.sleep(max(0.0, t - loop.time()))
            try:
                await action(n)
            except (httpx.HTTPError, OSError) as e:
                self._fail(action.__name__, e)
            n += 1

    async def upload(self, n: int) -> None:
        if not self.checkpoints:
            return
        path = self.checkpoints.pop(0)
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as c:
            r = await c.post("/recipes", data={"name": path.stem, "dataset_id": self.dataset_id},
                             files={"file": (path.name, path.read_bytes())})
        if r.status_code != 201:
            return self._fail("upload", r)
        self.ops.uploads.append(r.json()["id"])
        self.recipes.append(r.json()["id"])
        self.servable.append(r.json()["id"])

    async def merge(self, n: int) -> None:
        if n % 2:
            fresh = [m for m in self.recipes if m not in self.fisher_used][-3:]
            if len(fresh) < 2:
                self.ops.log.append(f"merge {n}: fewer than two recipes without a Fisher; skipped")
                return
            body = {"method": "fisher", "model_ids": fresh, "fisher": self.fisher, "evaluate": False}
            self.fisher_used.update(fresh)
        else:
            pair = next((frozenset((a, b)) for a in reversed(self.recipes) for b in reversed(self.recipes)
                         if a != b and frozenset((a, b)) not in self.pairs), None)
            if pair is None:
                return
            self.pairs.add(pair)
            body = {"method": "uniform", "model_ids": sorted(pair), "evaluate": False}
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as c:
            r = await c.post("/merge-jobs", json=body)
        if r.status_code != 202:
            return self._fail(f"merge ({body['method']})", r)
        job = r.json()
        self.ops.merges.append({"id": job["id"], "method": body["method"], "model_ids": body["model_ids"],
                                "children": [(c["kind"], c["id"]) for c in job["children"]],
                                "submitted": asyncio.get_running_loop().time() - self.t0})

    async def collect(self, n: int) -> None:
        """Merged models join the alias rotation as they appear."""
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as c:
            for m in self.ops.merges:
                if m.get("status") in TERMINAL:
                    continue
                r = await c.get(f"/merge-jobs/{m['id']}")
                if r.status_code != 200:
                    return self._fail("merge status", r)
                job = r.json()
                m["status"] = job["status"]
                if job["status"] == "succeeded":
                    self.servable.append(job["result_model_id"])

    async def switch(self, n: int) -> None:
        target = self.servable[(n + 1) % len(self.servable)]
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as c:
            r = await c.put("/aliases/production", json={"model_id": target})
        if r.status_code != 200:
            return self._fail("alias switch", r)
        self.ops.alias_switches += 1

    async def kill(self, n: int) -> None:
        """SIGKILL the worker with its pool as soon as it is running a job (or after `kill_wait` seconds of
        finding it idle), note what it was running and how large it was, start a new one at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.kill_wait
        while True:
            running = await loop.run_in_executor(None, self.worker.running)
            if running or loop.time() >= deadline:
                break
            await asyncio.sleep(0.1)
        procs = tree("worker", self.worker.worker.p.pid)
        await loop.run_in_executor(None, self.worker.kill_and_restart)
        self.ops.kills.append({"t": loop.time() - self.t0, "running": running, "procs": procs})


# --- deployments --------------------------------------------------------------------------------------
def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECMERGE_")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    return env


class Deployment:
    name = ""
    kills = False

    def __init__(self, work: Path, log_level: str):
        self.work = work
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_level = log_level
        self.api: Service | None = None

    def env(self) -> dict:
        raise NotImplementedError

    @property
    def data_dir(self) -> Path:
        raise NotImplementedError

    def start_api(self) -> None:
        argv = [str(BIN / "recmerge"), "serve", "--port", str(self.port), "--log-level", self.log_level]
        self.api = Service("api", argv, self.env(), self.work, self.work / "api.log")
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if not self.api.alive():
                raise SystemExit(f"{self.name}: the API exited:\n{self.api.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name}: the API did not answer /healthz within 120 s")

    def start(self) -> None:
        self.start_api()

    def processes(self) -> list[dict]:
        return tree("api", self.api.p.pid)

    def db_url(self) -> str:
        raise NotImplementedError

    def broker(self) -> dict | None:
        return None

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop(signal.SIGINT)


class Embedded(Deployment):
    name = "embedded"

    @property
    def data_dir(self) -> Path:
        return self.work / ".recmerge"  # the default, relative to the working directory

    def env(self) -> dict:
        return base_env()

    def db_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'recmerge.db'}"


class Redis:
    """A redis-server of the soak's own: the machine's Redis and its databases stay untouched."""

    def __init__(self, work: Path):
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class CeleryDeployment(Deployment):
    name = "celery"
    kills = True
    # Recovery on the soak's time scale: a killed attempt is noticed within ~12 s instead of 2 minutes.
    RECOVERY = {"RECMERGE_SWEEP_INTERVAL_S": "2", "RECMERGE_HEARTBEAT_TIMEOUT_S": "10", "RECMERGE_MAX_ATTEMPTS": "3"}

    def __init__(self, work: Path, log_level: str):
        super().__init__(work, log_level)
        self.redis: Redis | None = None
        self.dbname = f"recmerge_soak_{uuid.uuid4().hex[:10]}"
        self.worker: Service | None = None
        self.worker_starts = 0

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    def db_url(self) -> str:
        return f"{PG}/{self.dbname}"

    def env(self) -> dict:
        env = base_env()
        env.update(RECMERGE_DATA_DIR=str(self.data_dir), RECMERGE_DATABASE_URL=self.db_url(),
                   RECMERGE_BROKER_URL=self.redis.url, **self.RECOVERY)
        return env

    def _admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def start(self) -> None:
        self.redis = Redis(self.work / "redis")
        self._admin(f'CREATE DATABASE "{self.dbname}"')
        done = subprocess.run([str(BIN / "recmerge"), "db", "upgrade"], cwd=self.work, env=self.env(),
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"recmerge db upgrade failed:\n{done.stderr}")
        self.start_api()
        self.start_worker()

    def start_worker(self) -> None:
        self.worker_starts += 1
        argv = [str(BIN / "celery"), "-A", "workers.celery_app", "worker", "-Q", QUEUE, "--concurrency", "1",
                "--loglevel", "INFO", "-n", f"soak{self.worker_starts}@%h"]
        self.worker = Service("worker", argv, self.env(), REPO, self.work / "worker.log")

    def kill_and_restart(self) -> None:
        self.worker.kill()
        self.worker._out.close()
        self.start_worker()

    def running(self) -> list[str]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.db_url())
        try:
            with engine.connect() as c:
                return [f"{k} {s or ''}".strip() for k, s in
                        c.execute(text("SELECT kind, stage FROM jobs WHERE status = 'running'"))]
        finally:
            engine.dispose()

    def processes(self) -> list[dict]:
        procs = super().processes() + tree("worker", self.worker.p.pid)
        return procs + tree("redis-server (private)", self.redis.proc.pid)

    def broker(self) -> dict:
        import redis

        r = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        queues = {name.decode(): r.llen(name) for name in r.keys(f"{QUEUE}*") if r.type(name) == b"list"}
        unacked = r.hgetall("unacked")
        ids = []
        for raw in unacked.values():
            try:
                ids.append(json.loads(raw)[0]["headers"]["id"])
            except (ValueError, KeyError, IndexError, TypeError):
                ids.append("?")
        return {"queues": queues, "unacked": r.hlen("unacked"), "unacked_index": r.zcard("unacked_index"),
                "unacked_ids": ids, "keys": sorted(k.decode() for k in r.keys("*"))}

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        super().stop()
        if self.redis is not None:
            self.redis.stop()
        try:
            self._admin(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        except Exception as e:  # the report is still worth writing
            print(f"could not drop {self.dbname}: {e}", file=sys.stderr)


# --- after the traffic --------------------------------------------------------------------------------
def db_counts(url: str, merge_ids: list[str]) -> dict:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as c:
            rows = {t: c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("datasets", "models", "aliases", "jobs", "fishers", "events")}
            kinds = dict(c.execute(text("SELECT kind, count(*) FROM models GROUP BY kind")).all())
            jobs = [dict(r._mapping) for r in c.execute(text("SELECT id, kind, status, attempts, error FROM jobs"))]
            shas = {r[0] for r in c.execute(text("SELECT sha256 FROM models UNION SELECT sha256 FROM fishers"))}
            merged = {r[0]: r[1] for r in c.execute(text("SELECT source_job_id, sha256 FROM models "
                                                         "WHERE source_job_id IS NOT NULL"))}
    finally:
        engine.dispose()
    return {"rows": rows, "model_kinds": kinds, "jobs": jobs, "shas": shas,
            "merge_results": {j: merged.get(j) for j in merge_ids}}


def store_files(data_dir: Path) -> dict:
    objects = data_dir / "store" / "objects"
    names = [p.name for p in objects.rglob("*") if p.is_file()] if objects.exists() else []
    dirs = [p.name for p in (data_dir / "store" / "dirs").iterdir()] if (data_dir / "store" / "dirs").exists() else []
    return {"objects": names, "dirs": dirs, "temporary": [n for n in names + dirs if n.startswith(".")]}


def leftovers(data_dir: Path) -> list[str]:
    """Everything in the scratch directory but the (empty) root of the jobs' scratch directories."""
    tmp = data_dir / "tmp"
    if not tmp.exists():
        return []
    return [str(p.relative_to(data_dir)) for p in sorted(tmp.rglob("*")) if p != tmp / "jobs"]


def wait_jobs(url: str, timeout: float) -> float:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    t = time.monotonic()
    try:
        while time.monotonic() - t < timeout:
            with engine.connect() as c:
                open_ = c.execute(text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")).scalar_one()
            if open_ == 0:
                return time.monotonic() - t
            time.sleep(1)
    finally:
        engine.dispose()
    return float("nan")


def snapshot(dep: Deployment) -> dict:
    return {"load": machine.loadavg(), "procs": dep.processes(), "generator": proc_stats(os.getpid())}


# --- one deployment -----------------------------------------------------------------------------------
def run_deployment(dep: Deployment, args) -> dict:
    print(f"[{dep.name}] starting", flush=True)
    dep.start()
    work = dep.work
    client = httpx.Client(base_url=dep.base, timeout=120)
    users = write_interactions(work / "interactions.txt", args.users, args.items)
    with open(work / "interactions.txt", "rb") as f:
        r = client.post("/datasets", data={"name": "soak", "format": "sasrec"},
                        files={"file": ("interactions.txt", f)})
    r.raise_for_status()
    ds = r.json()
    minutes = args.minutes
    duration = minutes * 60.0
    n_uploads = int(duration // args.upload_every) + 1
    paths = make_checkpoints(work, n_uploads + 3, ds["n_items"], ds["fingerprint"])
    seeds = []
    for p in paths[:3]:
        with open(p, "rb") as f:
            r = client.post("/recipes", data={"name": p.stem, "dataset_id": ds["id"]}, files={"file": (p.name, f)})
        r.raise_for_status()
        seeds.append(r.json()["id"])
    client.put("/aliases/production", json={"model_id": seeds[0]}).raise_for_status()
    assert client.get(f"/recommend/{users[0]}", params={"model": "production"}).status_code == 200
    print(f"[{dep.name}] dataset {ds['n_users']} users / {ds['n_items']} items, {len(seeds)} seed recipes; "
          f"{minutes:g} min at {args.rps:g} req/s", flush=True)

    rec, ops = Recorded(), Ops()
    result: dict = {"name": dep.name, "dataset": {k: ds[k] for k in ("n_users", "n_items", "n_interactions")}}

    async def soak():
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.5
        traffic = Traffic(dep.base, ds["id"], paths[3:], seeds, ops, t0, duration,
                          worker=dep if dep.kills else None,
                          fisher={**FISHER, "max_users": args.fisher_users}, kill_wait=args.kill_wait)

        async def snap_at(key: str, t: float):
            await asyncio.sleep(max(0.0, t0 + t - loop.time()))
            result[key] = await loop.run_in_executor(None, snapshot, dep)
            print(f"[{dep.name}] {key} snapshot at {t:.0f} s: " + ", ".join(
                f"{p['role']} {p['rss_mib']:.0f} MiB" for p in result[key]["procs"]), flush=True)

        async def progress():
            m = 0
            while True:
                m += 1
                if t0 + 60 * m >= t0 + duration:
                    return
                await asyncio.sleep(max(0.0, t0 + 60 * m - loop.time()))
                procs = await loop.run_in_executor(None, dep.processes)
                result.setdefault("series", {})[m] = {p["role"]: p["rss_mib"] for p in procs}
                done = len(rec.ok)
                print(f"[{dep.name}] t={loop.time() - t0:.0f} s: {done} requests answered, "
                      f"{sum(rec.errors.values())} errors, {len(ops.uploads)} uploads, {len(ops.merges)} merges, "
                      f"{ops.alias_switches} switches, {len(ops.kills)} kills", flush=True)

        side = [traffic.every(args.upload_every, 5, traffic.upload),
                traffic.every(args.merge_every, 27, traffic.merge),
                traffic.every(5, 2, traffic.collect),
                traffic.every(args.switch_every, 3, traffic.switch),
                snap_at("start", args.warmup), progress()]
        if dep.kills:
            # Fisher merges go out at 0:57 of each minute: the kill waits from 0:57.5 for a running job.
            side.append(traffic.every(60, 57.5, traffic.kill))
        tasks = [asyncio.create_task(c) for c in side]
        sent = await recommend_traffic(dep.port, users, args.rps, t0, duration, rec)
        result["end"] = await loop.run_in_executor(None, snapshot, dep)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result["sent"] = sent
        result["elapsed"] = loop.time() - t0

    asyncio.run(soak())
    print(f"[{dep.name}] traffic over; waiting for the jobs", flush=True)
    result["drain_s"] = wait_jobs(dep.db_url(), args.drain)
    time.sleep(3)  # a sweep pass or two after the last job
    db = db_counts(dep.db_url(), [m["id"] for m in ops.merges])
    result["after"] = {"load": machine.loadavg(), "procs": dep.processes()}
    result["broker"] = dep.broker()
    result["store"] = store_files(dep.data_dir)
    result["leftovers"] = leftovers(dep.data_dir)
    result["db"] = db
    result["recorded"] = rec
    result["ops"] = ops
    api_log = dep.api.log.read_text(errors="replace")
    result["sweeper"] = {"re-queued": api_log.count("worker lost, re-queued"),
                         "sent again": api_log.count("sent again"), "failed": api_log.count("lost too often"),
                         "tracebacks": api_log.count("Traceback")}
    client.close()
    return result


# --- the report ---------------------------------------------------------------------------------------
def summarise(res: dict, args) -> dict:
    rec: Recorded = res["recorded"]
    ops: Ops = res["ops"]
    db = res["db"]
    sched = np.array(rec.scheduled)
    lat = np.array(rec.latency) * 1000
    ok = np.array(rec.ok, dtype=bool)
    minutes = []
    for m in range(int(np.ceil(args.minutes))):
        sel = (sched >= m * 60) & (sched < (m + 1) * 60)
        span = min(60.0, args.minutes * 60 - m * 60)
        good = lat[sel & ok]
        minutes.append({"minute": m + 1, "requests": int(sel.sum()), "errors": int((sel & ~ok).sum()),
                        "rps": float((sel & ok).sum() / span),
                        "p50": float(np.percentile(good, 50)) if good.size else float("nan"),
                        "p99": float(np.percentile(good, 99)) if good.size else float("nan")})
    good = lat[ok]
    jobs = db["jobs"]
    merges = {m["id"]: m for m in ops.merges}
    fisher_children = sum(1 for m in ops.merges for kind, _ in m["children"] if kind == "fisher")
    n_fisher_merges = sum(1 for m in ops.merges if m["method"] == "fisher")
    expected_fishers = sum(len(m["model_ids"]) for m in ops.merges if m["method"] == "fisher")
    expected = {"datasets": 1, "models": 3 + len(ops.uploads) + len(ops.merges), "aliases": 1,
                "jobs": len(ops.merges) + fisher_children, "fishers": expected_fishers, "events": 0}
    statuses = Counter(f"{j['kind']} {j['status']}" for j in jobs)
    retries = sum(max(0, j["attempts"] - 1) for j in jobs)
    failed = [j for j in jobs if j["status"] != "succeeded"]
    lost = [mid for mid in merges if db["merge_results"].get(mid) is None]
    missing_files = sorted(db["shas"] - set(res["store"]["objects"]))
    orphan_files = sorted(set(res["store"]["objects"]) - db["shas"])
    broker = res["broker"]
    broker_left = (sum(broker["queues"].values()) + broker["unacked"] + broker["unacked_index"]) if broker else 0
    growth = []
    start = {p["role"]: p for p in res["start"]["procs"]}
    for p in res["end"]["procs"]:
        s = start.get(p["role"])
        if s:
            growth.append({"role": p["role"], "cmd": p["cmd"], "pid0": s["pid"], "pid1": p["pid"],
                           "rss0": s["rss_mib"], "rss1": p["rss_mib"],
                           "growth": 100 * (p["rss_mib"] - s["rss_mib"]) / s["rss_mib"],
                           "fds0": s["fds"], "fds1": p["fds"]})
    # A worker lives one minute between kills: its growth is read across incarnations at the same age,
    # just before the first kill after the warm-up and just before the last one.
    kills = [k for k in ops.kills if k["t"] >= args.warmup]
    worker_growth = []
    if len(kills) >= 2:
        first = {p["role"]: p for p in kills[0]["procs"]}
        for p in kills[-1]["procs"]:
            if p["role"] in first:
                f = first[p["role"]]
                worker_growth.append({"role": p["role"], "rss0": f["rss_mib"], "rss1": p["rss_mib"],
                                      "growth": 100 * (p["rss_mib"] - f["rss_mib"]) / f["rss_mib"],
                                      "t0": kills[0]["t"], "t1": kills[-1]["t"]})
    real_errors = sum(rec.errors.values()) + sum(ops.errors.values()) + len(failed)
    if res["name"] != "celery":
        real_errors += retries  # nothing was killed: a retry is a fault of its own
    return {"minutes": minutes, "requests": int(sched.size), "answered": int(ok.sum()),
            "rps": float(ok.sum() / (args.minutes * 60)), "p50": float(np.percentile(good, 50)) if good.size else 0,
            "p99": float(np.percentile(good, 99)) if good.size else 0,
            "max": float(good.max()) if good.size else 0, "expected": expected, "statuses": statuses,
            "retries": retries, "failed": failed, "lost": lost, "missing_files": missing_files,
            "orphan_files": orphan_files, "broker_left": broker_left, "growth": growth, "real_errors": real_errors,
            "worker_growth": worker_growth,
            "n_fisher_merges": n_fisher_merges}


def render(results: list[dict], args, command: str, machine_line: str, load_end: list[str]) -> str:
    out = ["# Soak: mixed traffic against the embedded and the Celery deployments", "",
           f"Command: `{command}`", "",
           f"Machine: {machine_line}; load average {' '.join(load_end)} at the end. The machine is shared "
           "(2 cores): the API, the worker, the private redis-server, PostgreSQL and this load generator all "
           "run on it.", "",
           f"Each deployment: {args.minutes:g} minutes of traffic, the first {args.warmup:g} s the warm-up. "
           f"GET /recommend/{{user}}?model=production&k=10 at {args.rps:g} req/s open-loop (each request has a "
           "scheduled send time; its latency counts from then, so a stalled server shows as latency, not as a "
           "slower client; up to 256 keep-alive connections, 10 s timeout), a random user each time; a recipe "
           f"upload every {args.upload_every:g} s (random-init BERT4Rec checkpoints, hidden {SHAPE['hidden']}, "
           f"{SHAPE['layers']} layers, max_len {SHAPE['max_len']}), a merge job every {args.merge_every:g} s "
           "alternating uniform over a pair of recipes never merged together and Fisher over the (up to) three "
           f"newest recipes without a Fisher (Fishers {json.dumps(FISHER)}; no evaluation), and the `production` "
           f"alias switched every {args.switch_every:g} s round the recipes and merged models. Dataset: "
           f"{args.users} synthetic users, {args.items} items, uploaded through POST /datasets.", "",
           "- **embedded**: `recmerge serve --log-level warning` with no RECMERGE_* variable, in an empty "
           "temporary directory (SQLite and store under ./.recmerge, jobs on the API's in-process runner). "
           "No process is killed.",
           "- **celery**: the same `recmerge serve` with RECMERGE_DATABASE_URL (a fresh PostgreSQL database), "
           "RECMERGE_BROKER_URL (a private redis-server started for the run; the machine's Redis is not "
           "touched), RECMERGE_DATA_DIR, and recovery on the soak's time scale "
           f"({', '.join(f'{k}={v}' for k, v in CeleryDeployment.RECOVERY.items())}); one worker "
           f"`celery -A workers.celery_app worker -Q {QUEUE} --concurrency 1` (docker-compose.yml's command), "
           "SIGKILLed with its pool process every minute (at 0:02 of each minute, 5 s after a Fisher merge was "
           "submitted, meant to land in its Fisher jobs: the kill table says which did) and started again at once.", "",
           "RSS and open file descriptors come from /proc, read at the end of the warm-up (start) and when the "
           "traffic stops (end). Rows, store files, scratch and the broker are read after every job has ended.",
           ""]
    sums = [summarise(r, args) for r in results]
    # Goals first: the headline.
    out += ["## Goals", "", "| deployment | goal | result | |", "|---|---|---|---|"]
    for r, s in zip(results, sums):
        worst = max((g for g in s["growth"] if not g["role"].startswith("worker")), key=lambda g: g["growth"],
                    default=None)
        rss_ok = worst is not None and worst["growth"] < 10
        rss_text = (f"largest {worst['growth']:+.1f}% ({worst['role']}, {worst['rss0']:.0f} → "
                    f"{worst['rss1']:.0f} MiB)" if worst else "–")
        if r["name"] == "celery":
            w = max(s["worker_growth"], key=lambda g: g["growth"], default=None)
            if w is None:
                rss_text += "; worker: fewer than two kills after the warm-up, not measured"
                rss_ok = False
            else:
                rss_text += (f"; worker, read just before the kills at {w['t0']:.0f} s and {w['t1']:.0f} s: largest "
                             f"{w['growth']:+.1f}% ({w['role']}, {w['rss0']:.0f} → {w['rss1']:.0f} MiB)")
                rss_ok = rss_ok and w["growth"] < 10
        lost_text = (f"{len(s['lost'])} of {len(r['ops'].merges)} merge jobs without their model; "
                     f"{len(s['missing_files'])} rows without their store file")
        nothing_lost = not s["lost"] and not s["missing_files"] and not s["failed"]
        left = len(r["leftovers"]) + len(r["store"]["temporary"]) + s["broker_left"]
        left_text = (f"{len(r['leftovers'])} scratch entries, {len(r['store']['temporary'])} temporary store files"
                     + (f", broker: queue {sum(r['broker']['queues'].values())}, unacked {r['broker']['unacked']}, "
                        f"unacked_index {r['broker']['unacked_index']}" if r["broker"] else ""))
        retry_text = (f" ({s['retries']} job retries after the {len(r['ops'].kills)} kills: expected, not counted)"
                      if r["name"] == "celery" else f" ({s['retries']} job retries)")
        for goal, met, text in [
            ("0 errors other than the kills' retries", s["real_errors"] == 0, f"{s['real_errors']} errors{retry_text}"),
            ("RSS growth < 10% after warm-up", rss_ok, rss_text),
            ("nothing lost", nothing_lost, lost_text),
            ("nothing left over", left == 0, left_text),
        ]:
            out.append(f"| {r['name']} | {goal} | {text} | **{'met' if met else 'missed'}** |")
    out.append("")
    for r, s in zip(results, sums):
        ops: Ops = r["ops"]
        rec: Recorded = r["recorded"]
        roles = [p["role"] for p in r["end"]["procs"] if not p["role"].startswith("redis")]
        out += [f"## {r['name']}", "",
                f"Load average {' '.join(r['start']['load'])} at the end of the warm-up, "
                f"{' '.join(r['end']['load'])} when traffic stopped. "
                f"Recommend: {s['requests']} requests scheduled, {s['answered']} answered with 200, "
                f"achieved **{s['rps']:.1f} req/s** (asked {args.rps:g}); p50 {s['p50']:.1f} ms, "
                f"**p99 {s['p99']:.1f} ms**, max {s['max']:.0f} ms over the whole run. "
                f"Jobs ended {r['drain_s']:.0f} s after the traffic stopped.", "",
                "RSS per minute is read at the minute's end (the last minute's: the end snapshot); the worker's "
                "is whichever process runs then.", "",
                "| minute | requests | errors | answered/s | p50 ms | p99 ms | RSS MiB: " + ", ".join(roles) + " |",
                "|---:|---:|---:|---:|---:|---:|---|"]
        series = {**r.get("series", {}), len(s["minutes"]): {p["role"]: p["rss_mib"] for p in r["end"]["procs"]}}
        for m in s["minutes"]:
            tag = " (warm-up)" if m["minute"] * 60 <= args.warmup else ""
            rss = series.get(m["minute"], {})
            out.append(f"| {m['minute']}{tag} | {m['requests']} | {m['errors']} | {m['rps']:.1f} | {m['p50']:.1f} | "
                       f"{m['p99']:.1f} | " + ", ".join(f"{rss[k]:.0f}" if k in rss else "–" for k in roles) + " |")
        out += ["", "Errors by kind:", ""]
        kinds = [(f"GET /recommend: {k}", v) for k, v in rec.errors.items()] + list(ops.errors.items())
        kinds += [(f"job {j['kind']} {j['status']}: {(j['error'] or '')[:120]}", 1) for j in s["failed"]]
        if r["name"] != "celery" and s["retries"]:
            kinds.append(("job retries with nothing killed", s["retries"]))
        out += [f"- {k}: {v}" for k, v in kinds] or ["- none"]
        if r["name"] == "celery":
            hit = sum(1 for k in ops.kills if k["running"])
            out += [f"- expected, from the kills: {len(ops.kills)} worker SIGKILLs ({hit} while a job was running"
                    + "".join(f"; {', '.join(k['running'])}" for k in ops.kills if k["running"])
                    + f"), {s['retries']} job retries (attempts beyond the first); the sweeper logged "
                      f"{r['sweeper']['re-queued']} re-queues of lost jobs, {r['sweeper']['sent again']} re-sends "
                      f"of lost messages, {r['sweeper']['failed']} jobs failed for too many lost attempts"]
        out += [f"- API log: {r['sweeper']['tracebacks']} tracebacks", ""]
        out += ["Processes (RSS in MiB; fds = open file descriptors):", "",
                "| process | command | pid start → end | RSS start | RSS end | growth | fds start | fds end |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        for g in s["growth"]:
            out.append(f"| {g['role']} | {g['cmd']} | {g['pid0']} → {g['pid1']} | {g['rss0']:.1f} | {g['rss1']:.1f} | "
                       f"{g['growth']:+.1f}% | {g['fds0']} | {g['fds1']} |")
        g0, g1 = r["start"]["generator"], r["end"]["generator"]
        out.append(f"| load generator (this script) | python bench/soak.py | {g0['pid']} | {g0['rss_mib']:.1f} | "
                   f"{g1['rss_mib']:.1f} | {100 * (g1['rss_mib'] - g0['rss_mib']) / g0['rss_mib']:+.1f}% | "
                   f"{g0['fds']} | {g1['fds']} |")
        if r["name"] == "celery":
            out += ["", "The worker's rows above compare different processes (a new one after every kill). Its RSS "
                    "just before each kill, each process one minute old:", "",
                    "| kill at | job running | " + " | ".join(p["role"] for p in ops.kills[0]["procs"]) + " |",
                    "|---:|---|" + "---:|" * len(ops.kills[0]["procs"])] if ops.kills else []
            for k in ops.kills:
                out.append(f"| {k['t']:.0f} s | {', '.join(k['running']) or '–'} | "
                           + " | ".join(f"{p['rss_mib']:.0f} MiB, {p['fds']} fds" for p in k["procs"]) + " |")
        after = ", ".join(f"{p['role']} {p['rss_mib']:.0f} MiB / {p['fds']} fds" for p in r["after"]["procs"])
        out += ["", f"After every job ended: {after}.", ""]
        rows, exp = r["db"]["rows"], s["expected"]
        out += [f"Submitted: {len(ops.uploads)} recipe uploads (+3 seeds before the traffic), {len(ops.merges)} "
                f"merge jobs ({s['n_fisher_merges']} Fisher), {ops.alias_switches} alias switches"
                + (f", {len(ops.kills)} worker kills" if r["name"] == "celery" else "") + ".", "",
                "| rows | expected | found |", "|---|---:|---:|"]
        for t in ("datasets", "models", "jobs", "fishers", "aliases", "events"):
            out.append(f"| {t} | {exp[t]} | {rows[t]} |")
        out += ["", "Job statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items())) + ".",
                f"Store: {len(r['store']['objects'])} objects for {len(r['db']['shas'])} distinct sha256 in the "
                f"models and fishers rows ({len(s['missing_files'])} missing, {len(s['orphan_files'])} without a row), "
                f"{len(r['store']['dirs'])} prepared dataset directories, {len(r['store']['temporary'])} temporary "
                "files.",
                f"Scratch (DATA_DIR/tmp) after the jobs: {r['leftovers'] or 'empty'}."]
        if r["broker"]:
            b = r["broker"]
            out.append(f"Broker (Celery's Redis transport): queue lists {b['queues'] or '{gpu: absent}'}, "
                       f"`unacked` {b['unacked']} entries, `unacked_index` {b['unacked_index']}"
                       + (f" (message ids {', '.join(b['unacked_ids'])})" if b["unacked_ids"] else "")
                       + f"; keys: {', '.join(b['keys'])}.")
        if ops.log:
            out += ["", "Control-call failures:", "", *[f"- {line}" for line in ops.log[:20]]]
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="traffic per deployment, warm-up included")
    ap.add_argument("--rps", type=float, default=300.0, help="GET /recommend requests per second (open loop)")
    ap.add_argument("--deployments", default="embedded,celery")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the start snapshot")
    ap.add_argument("--upload-every", type=float, default=20.0)
    ap.add_argument("--merge-every", type=float, default=30.0)
    ap.add_argument("--switch-every", type=float, default=10.0)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--fisher-users", type=int, default=2000,
                    help="users per Fisher of the soak's Fisher merges (long enough for a kill to land in one)")
    ap.add_argument("--kill-wait", type=float, default=20.0,
                    help="celery: the longest a kill waits for the worker to be running a job")
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--drain", type=float, default=300.0, help="longest wait for the jobs after the traffic")
    ap.add_argument("--log-level", default="warning", help="the API's uvicorn log level (info logs every request)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories (logs, data)")
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    args = ap.parse_args()
    kinds = {"embedded": Embedded, "celery": CeleryDeployment}
    names = [n.strip() for n in args.deployments.split(",") if n.strip()]
    if not names or any(n not in kinds for n in names):
        ap.error(f"--deployments: a comma-separated list of {', '.join(kinds)}")
    if args.warmup >= args.minutes * 60:
        ap.error("--warmup must end before the traffic does")
    command = " ".join(["nice -n 10" if os.nice(0) >= 10 else "", ".venv/bin/python bench/soak.py",
                        *sys.argv[1:]]).strip()
    machine_line = machine.line(with_torch=False)
    results = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"soak-{name}-"))
        dep = kinds[name](work, args.log_level)
        try:
            results.append(run_deployment(dep, args))
        finally:
            dep.stop()
            if args.keep:
                print(f"[{name}] kept {work}", flush=True)
            else:
                shutil.rmtree(work, ignore_errors=True)
    report = render(results, args, command, machine_line, machine.loadavg())
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        raw = [{**summarise(r, args), "name": r["name"], "series": r.get("series", {}), "kills": r["ops"].kills,
                "errors": dict(r["recorded"].errors), "op_errors": dict(r["ops"].errors), "broker": r["broker"],
                "leftovers": r["leftovers"], "rows": r["db"]["rows"], "sweeper": r["sweeper"]} for r in results]
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
