"""Peak memory and read throughput of a Fisher merge of three ~1 GB checkpoints: the streaming engine
(merging.merge) against a naive load-everything merge, each in its own child process, measured with
wait4's ru_maxrss. Page-cache state is set and reported for every run: "cold" evicts the inputs
(posix_fadvise DONTNEED on those files only), "warm" reads them once first; `fincore` shows what was
resident when each child started. Each streaming kind runs `--repeat` times, interleaved, and every cold run
follows a read of the same evicted files with the engine's IO and no computing: what the disk gave then.

    nice -n 5 .venv/bin/python bench/merge_memory.py [--items 1000000 --hidden 256] [--repeat 3] [--out F.md]

The checkpoints are real recmerge checkpoints of a BERT4Rec backbone with a large catalogue, so the
item table (~1 GB) is almost the whole file: the worst case for "memory near M x the largest tensor".
Everything is written under a temporary directory and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine  # noqa: E402

M = 3  # checkpoints (and Fishers)


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


# ---- synthetic inputs ----------------------------------------------------------------------------

def write_inputs(work: Path, n_items: int, hidden: int, sq_norm: bool = True) -> dict:
    """M checkpoints + M Fishers, streamed to disk block by block (this process never holds a file). Each
    Fisher carries its `sq_norm` as estimate_fisher writes it, unless `sq_norm` is False (a Fisher written
    before the field); the header goes first, so its blocks are generated twice from the same seed."""
    import torch

    from merging.fisher_norm import FIELD, SquaredNorm
    from merging.io import SafetensorsWriter, TensorInfo, row_blocks
    from models.backbone import SeqRecModel
    from models.checkpoint import CheckpointMeta
    from models.config import BackboneConfig

    cfg = BackboneConfig(n_items=n_items, hidden=hidden, layers=2, heads=4, inner=4 * hidden, max_len=200)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SeqRecModel(cfg).state_dict().items()}
    entries = [(k, torch.float32, s) for k, s in shapes.items()]
    meta = CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec"}, dataset_fingerprint="be" * 32, n_items=n_items)
    ckpts, fishers = [], []
    for i in range(M):
        g = torch.Generator().manual_seed(i)
        path = work / f"ckpt{i}.safetensors"
        with SafetensorsWriter(path, entries, meta.to_header()) as w:
            for name, _, shape in entries:
                for a, b in row_blocks(TensorInfo(name, torch.float32, shape, 0, 4 * _numel(shape)), 4 << 20):
                    w.write(name, torch.randn((b - a, *shape[1:]) if shape else (), generator=g) * 0.05)
            sha = w.commit()
        ckpts.append(path)
        fpath = work / f"fisher{i}.safetensors"
        fmeta = {"checkpoint_sha256": sha, "dataset_fingerprint": meta.dataset_fingerprint, "sampling": "synthetic"}
        if sq_norm:
            state, acc = g.get_state(), SquaredNorm()
            for _, block, last in _fisher_blocks(entries, g):
                acc.add(block)
                if last:
                    acc.end_tensor()
            fmeta[FIELD] = repr(acc.value)
            g.set_state(state)
        with SafetensorsWriter(fpath, entries, fmeta) as w:
            for name, block, _ in _fisher_blocks(entries, g):
                w.write(name, block)
            w.commit()
        fishers.append(fpath)
    return {"ckpts": [str(p) for p in ckpts], "fishers": [str(p) for p in fishers], "config": cfg.to_json()}


def _fisher_blocks(entries, g):
    """(name, block, last block of its tensor) of a synthetic Fisher, in file order."""
    import torch

    from merging.io import TensorInfo, row_blocks

    for name, _, shape in entries:
        blocks = row_blocks(TensorInfo(name, torch.float32, shape, 0, 4 * _numel(shape)), 4 << 20)
        for k, (a, b) in enumerate(blocks):
            block = torch.rand((b - a, *shape[1:]) if shape else (), generator=g)
            if name == "item_emb.weight":
                block[::997] = 0.0  # rows no user touched: some entries fall back
            yield name, block, k == len(blocks) - 1


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- page cache ----------------------------------------------------------------------------------

def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths) -> None:
    buf = bytearray(8 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident_share(paths) -> float:
    """Share of the files' pages in the page cache, from util-linux fincore (None when it is missing)."""
    if not shutil.which("fincore"):
        return float("nan")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    res = size = 0
    for line in out.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else float("nan")


def _read_files(paths, block: int) -> int:
    """Read the files a block of each in turn, as the engine does (merging/io.py: kernel readahead with
    FADV_SEQUENTIAL, each block dropped from the cache once read). Returns the bytes read."""
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    buf, total = memoryview(bytearray(block)), 0
    try:
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for off in range(0, max(os.path.getsize(p) for p in paths), block):
            for fd in fds:
                got = os.preadv(fd, [buf], off)
                total += got
                os.posix_fadvise(fd, off, got, os.POSIX_FADV_DONTNEED)  # block-aligned here
    finally:
        for fd in fds:
            os.close(fd)
    return total


def disk_read(groups: list[list[str]], block: int = 4 << 20) -> float:
    """GB/s of reading the (evicted) inputs with the engine's pattern of IO and no computing: one thread per
    group (the engine reads the checkpoints on its read-ahead thread and the Fishers on the merge thread),
    so each cold merge can be set against what the disk gave just before."""
    from concurrent.futures import ThreadPoolExecutor

    evict([p for g in groups for p in g])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as pool:
        total = sum(pool.map(lambda g: _read_files(g, block), groups))
    return total / 1e9 / (time.perf_counter() - t0)


# ---- the children --------------------------------------------------------------------------------

def child(mode: str, spec: dict, out: str) -> None:
    """Runs in its own process; prints one JSON line of timings."""
    from merging.merge import merge_checkpoints

    t0, c0 = time.perf_counter(), time.process_time()
    if mode in ("streaming", "store"):
        stages: dict[str, list[float]] = {}

        def progress(stage: str, f: float) -> None:
            stages.setdefault(stage, [time.perf_counter() - t0, 0.0])[1] = time.perf_counter() - t0

        # "store": the checkpoints' digests are given, as the service's worker gives those of the store's files
        res = merge_checkpoints("fisher", spec["ckpts"], out, fishers=spec["fishers"], options={"normalize": True},
                                progress=progress, sha256s=spec["ckpt_sha256"] if mode == "store" else None)
        print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                          "bytes_read": res.bytes_read, "output_reread": res.output_reread, "stages": stages,
                          "fallback_entries": res.stats["fallback_entries"]}))
        return
    # naive: load every checkpoint and Fisher whole, merge in memory, save
    import torch
    from safetensors.torch import load_file, save_file

    from merging.merge import build_method, merge_state_dicts

    torch.set_num_threads(1)  # as the streaming engine runs its passes, so only the memory strategy differs
    states = [load_file(p) for p in spec["ckpts"]]
    fishers = [load_file(p) for p in spec["fishers"]]
    t_load = time.perf_counter() - t0
    merged = merge_state_dicts(build_method("fisher", M, {"normalize": True}), states, fishers=fishers)
    save_file(merged, out)
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                      "load_seconds": t_load,
                      "bytes_read": sum(os.path.getsize(p) for p in spec["ckpts"] + spec["fishers"])}))


def run_child(mode: str, spec_path: Path, out: Path) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(spec_path), str(out)],
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{mode} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return result


def baseline_rss() -> int:
    """The fixed cost every child pays: interpreter + torch + our packages, before touching any file."""
    proc = subprocess.Popen([sys.executable, "-c", "import torch, merging.merge, safetensors.torch"],
                            cwd=Path(__file__).resolve().parents[1])
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_maxrss * 1024


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from merging.io import SafetensorsReader, row_blocks

    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        if set(ra.tensors) != set(rb.tensors):
            return False
        for name, info in ra.tensors.items():
            for s, e in row_blocks(info, 4 << 20):
                if not torch.equal(ra.read(name, s, e), rb.read(name, s, e)):
                    return False
    return True


# ---- report --------------------------------------------------------------------------------------

def _disk(r: dict) -> str:
    return f"{r['disk_gbps']:.2f} GB/s" if "disk_gbps" in r else "–"


def medians(rows: list[dict]) -> list[str]:
    """One line per kind of run: median wall time and throughput, the range, peak RSS at most."""
    import statistics

    out = ["| kind | runs | median read throughput | range | median wall time | peak RSS (max) | disk alone "
           "(median) | merge / disk |", "|---|---|---|---|---|---|---|---|"]
    kinds: dict[tuple, list[dict]] = {}
    for r in rows:
        kinds.setdefault(r["kind"], []).append(r)
    for rs in kinds.values():
        rates = [r["bytes_read"] / 1e9 / r["seconds"] for r in rs]
        disk = [r["disk_gbps"] for r in rs if "disk_gbps" in r]
        ratio = statistics.median(rate / r["disk_gbps"] for rate, r in zip(rates, rs) if "disk_gbps" in r) \
            if disk else None
        out.append(f"| {rs[0]['label']} | {len(rs)} | **{statistics.median(rates):.2f} GB/s** | "
                   f"{min(rates):.2f}–{max(rates):.2f} | {statistics.median(r['seconds'] for r in rs):.1f} s | "
                   f"{max(r['peak_rss'] for r in rs) / 2**30:.2f} GiB | "
                   f"{f'{statistics.median(disk):.2f} GB/s' if disk else '–'} | "
                   f"{f'{ratio:.2f}' if ratio is not None else '–'} |")
    return out


def report(args, mach: dict, sizes: dict, rows: list[dict], base_rss: int, equal: bool | None, setup_s: float) -> str:
    gb = 1e9
    lines = [
        "# Merge memory and throughput (bench/merge_memory.py)",
        "",
        f"Command: `nice -n 5 .venv/bin/python bench/merge_memory.py --items {args.items} --hidden {args.hidden}"
        f" --repeat {args.repeat}{' --skip-naive' if args.skip_naive else ''}"
        f"{'' if args.sq_norm else ' --no-sq-norm'}{' --out ' + args.out if args.out else ''}`",
        "",
        f"Machine: {mach['cpu']}, nproc {mach['nproc']}, {mach['ram_gib']:.1f} GiB RAM "
        f"({mach['available_gib']:.1f} GiB available at start), load average {' '.join(mach['loadavg'])} at start "
        f"(the machine is shared), Python {mach['python']}.",
        "",
        f"Inputs: {M} recmerge checkpoints of {sizes['ckpt'] / gb:.2f} GB each (BERT4Rec backbone, "
        f"{args.items:,} items x hidden {args.hidden}; the largest tensor, `item_emb.weight`, is "
        f"{sizes['largest'] / gb:.2f} GB) and {M} Fishers of the same size: {sizes['total'] / gb:.2f} GB of input. "
        "Method `fisher` with `normalize=true`; " + (
            "the Fishers carry their `sq_norm` in their metadata, so the merge takes each norm from there and "
            "reads every input once. " if args.sq_norm else
            "the Fishers lack `sq_norm` (as files written before the field), so the merge reads each twice: once "
            "for its norm, once to merge. ") +
        f"Writing the inputs took {setup_s:.0f} s.",
        "",
    ]
    lines += medians(rows) + [
        "",
        "Every run, in the order run (cold runs: just before, the disk alone read the same evicted files as the "
        "engine reads them, without computing: the checkpoints on one thread and the Fishers on another, a 4 MiB "
        "block of each in turn, each dropped once read):",
        "",
        "| run | page cache at start | peak RSS | wall time | CPU time | GB read | read throughput | GB read per "
        "CPU second | disk alone | phases |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        read = r["bytes_read"]
        stages = ""
        if "stages" in r:
            stages = ", ".join(f"{k} {v[1] - v[0]:.1f} s" for k, v in r["stages"].items())
        elif "load_seconds" in r:
            stages = f"load_file returned after {r['load_seconds']:.1f} s (pages are read on first touch)"
        lines.append(f"| {r['label']} | {r['resident'] * 100:.0f}% of inputs resident "
                     f"| {r['peak_rss'] / 2**30:.2f} GiB | {r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s "
                     f"| {read / gb:.2f} | {read / gb / r['seconds']:.2f} GB/s | {read / gb / r['cpu_seconds']:.2f} "
                     f"| {_disk(r)} | {stages} |")
    lines += [
        "",
        f"Baseline: a child that only imports torch and merging peaks at {base_rss / 2**30:.2f} GiB RSS; every row "
        "includes it. Wall and CPU time (user + system, all threads) are measured inside the child around the "
        "merge, after its imports.",
        "GB read counts every pass over the inputs: for the streaming engine the merge pass, which also computes "
        "each checkpoint's sha256 (recorded in the output and checked against each Fisher's `checkpoint_sha256`) "
        "from the bytes it reads, and a Fisher-norm pass over each Fisher without `sq_norm`; a separate hashing "
        "read, where one is needed, would count too.",
    ]
    reread = [r["output_reread"] for r in rows if r.get("output_reread")]
    if reread:
        lines.append(f"Not counted: without given digests the streaming engine reads its output back once "
                     f"({reread[0] / gb:.2f} GB, just written, so from the page cache) to hash it after writing the "
                     "digests into its header. With the checkpoints' digests given (`sha256s=`, what the service's "
                     "worker passes for files of the content-addressed store) the header is final from the start "
                     "and the output is hashed as it is written; the given digests are still checked against the "
                     "bytes the merge reads.")
    if equal is not None:
        lines.append(f"Streaming and naive outputs identical tensor for tensor: {'yes' if equal else 'NO'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--workdir", help="where the temporary files go (default: the system temp dir)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each streaming kind (cold/warm, with and "
                    "without given digests), interleaved; medians are reported beside every run")
    ap.add_argument("--no-sq-norm", dest="sq_norm", action="store_false",
                    help="write the Fishers without their sq_norm field, as before it existed: the merge then "
                         "reads each Fisher twice (the fallback norm pass)")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, spec, out = args.child
        child(mode, json.loads(Path(spec).read_text()), out)
        return

    ckpt_bytes = (args.items + 2) * args.hidden * 4 * 1.01
    need_disk = ckpt_bytes * (2 * M + 2) + (2 << 30)
    parent = Path(args.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < need_disk:
        raise SystemExit(f"{parent}: {free / 1e9:.1f} GB free, the benchmark needs {need_disk / 1e9:.1f} GB")
    mach = machine.describe(with_torch=False)
    work = Path(tempfile.mkdtemp(prefix="merge_memory.", dir=parent))
    try:
        t0 = time.perf_counter()
        spec = write_inputs(work, args.items, args.hidden, args.sq_norm)
        setup_s = time.perf_counter() - t0
        from models.checkpoint import file_sha256

        spec["ckpt_sha256"] = [file_sha256(p) for p in spec["ckpts"]]
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        inputs = spec["ckpts"] + spec["fishers"]
        from merging.io import SafetensorsReader

        with SafetensorsReader(spec["ckpts"][0]) as r:
            largest = max(t.nbytes for t in r.tensors.values())
        sizes = {"ckpt": os.path.getsize(spec["ckpts"][0]), "largest": largest,
                 "total": sum(os.path.getsize(p) for p in inputs)}
        base = baseline_rss()
        rows, disk = [], []
        plan = [("streaming", "cold"), ("naive", "cold")]
        for _ in range(args.repeat):  # interleaved, so a slow spell of the shared machine hits every kind
            plan += [("streaming", "warm"), ("store", "cold"), ("store", "warm"), ("streaming", "cold")]
        plan.pop()  # the first streaming cold run stands for the last repeat's
        for mode, cache in plan:
            out = work / f"{mode}.safetensors"
            out.unlink(missing_ok=True)
            if mode == "naive":
                if args.skip_naive:
                    continue
                need = 2.3 * sizes["total"]
                if mem_available() - need < (4 << 30):
                    print(f"skipping the naive run: needs ~{need / 2**30:.1f} GiB, "
                          f"{mem_available() / 2**30:.1f} GiB available", file=sys.stderr)
                    continue
            if cache == "cold":
                if mode != "naive":
                    disk.append(disk_read([spec["ckpts"], spec["fishers"]]))
                    print(f"disk alone: {disk[-1]:.2f} GB/s", file=sys.stderr, flush=True)
                evict(inputs)
            else:
                warm(inputs)
            resident = resident_share(inputs)
            print(f"{mode} ({cache}, {resident * 100:.0f}% resident) ...", file=sys.stderr, flush=True)
            r = run_child(mode, spec_path, out)
            label = "streaming, digests given (store)" if mode == "store" else mode
            r.update(label=f"{label} ({cache})", resident=resident, kind=(mode, cache))
            if cache == "cold" and mode != "naive":
                r["disk_gbps"] = disk[-1]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        naive = work / "naive.safetensors"
        equal = same_tensors(work / "streaming.safetensors", naive) if naive.exists() else None
        text = report(args, mach, sizes, rows, base, equal, setup_s)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
