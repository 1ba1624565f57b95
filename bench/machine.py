"""What every benchmark report says about the machine it ran on (these machines are shared: the load
average belongs in every result)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    except OSError:
        return platform.processor() or "unknown CPU"


def memory_gib() -> tuple[float, float]:
    """(total, available) RAM in GiB."""
    try:
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return mem["MemTotal"] / 2**20, mem["MemAvailable"] / 2**20
    except (OSError, KeyError):
        return float("nan"), float("nan")


def loadavg() -> list[str]:
    return [f"{x:.2f}" for x in os.getloadavg()]


def describe(with_torch: bool = True) -> dict:
    total, available = memory_gib()
    d = {"cpu": cpu_model(), "nproc": os.cpu_count(), "ram_gib": total, "available_gib": available,
         "python": platform.python_version(), "loadavg": loadavg()}
    if with_torch:  # a benchmark that measures a child's memory keeps torch out of its own process
        import torch

        d.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return d


def line(with_torch: bool = True) -> str:
    d = describe(with_torch)
    parts = [d["cpu"], f"{d['nproc']} cores", f"load average {' '.join(d['loadavg'])} at the start"]
    if with_torch:
        parts += [f"{d['torch_threads']} torch threads", f"torch {d['torch']}"]
    return ", ".join(parts + [f"Python {d['python']}"])
