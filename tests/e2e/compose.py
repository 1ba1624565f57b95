"""The service commands of docker-compose.yml, for tests that run them natively."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def command(service: str, port: int | None = None) -> list[str]:
    """The service's command as compose runs it; the API listens on loopback and the given port here,
    not on every interface and port 8000 as in its container."""
    cmd = [str(c) for c in services()[service]["command"]]
    if cmd[0] == "recmerge" and shutil.which("recmerge", path=str(Path(sys.executable).parent)) is None:
        cmd = [sys.executable, "-m", "app.cli", *cmd[1:]]  # a checkout not installed with pip: same entry point
    if "--host" in cmd:
        cmd[cmd.index("--host") + 1] = "127.0.0.1"
    if port is not None and "--port" in cmd:
        cmd[cmd.index("--port") + 1] = str(port)
    return cmd
