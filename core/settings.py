"""One Settings object for the API, the workers and the CLI, read from `RECMERGE_*` environment variables.

With nothing set the service runs embedded: a SQLite file and an artifact directory under ./.recmerge,
jobs in-process. Each external piece (PostgreSQL, Redis, S3) is switched on by its own variable.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECMERGE_", case_sensitive=False, extra="ignore")

    DATA_DIR: Path = Path(".recmerge")
    DATABASE_URL: str = ""  # "" = sqlite:///DATA_DIR/recmerge.db
    BROKER_URL: str | None = None  # None = jobs run in-process (embedded mode)
    STORE_URL: str = ""  # "" = file://DATA_DIR/store; or s3://bucket/prefix
    S3_ENDPOINT_URL: str | None = None  # e.g. a MinIO or moto server; credentials come from AWS_* variables
    API_TOKEN: str | None = None  # None = no auth on write calls
    # Reads (listings, model files, job status, metrics) are open unless READ_TOKEN is set; recommendations
    # are open unless RECOMMEND_TOKEN is set. A stronger token opens the weaker doors: API > READ > RECOMMEND.
    READ_TOKEN: str | None = None
    RECOMMEND_TOKEN: str | None = None
    MAX_UPLOAD_BYTES: int = 2 * 1024**3
    MODEL_CACHE_SIZE: int = 4
    DEVICE: str = "auto"  # auto | cpu | cuda | cuda:N
    SWEEP_INTERVAL_S: float = 30.0
    HEARTBEAT_TIMEOUT_S: float = 120.0
    MAX_ATTEMPTS: int = 3
    # Serving: how long the micro-batcher waits for company, and how large a batch may grow.
    BATCH_WAIT_MS: float = 2.0
    BATCH_MAX: int = 32
    BATCH_PIPELINE: int = 2  # batches out at once: the next one is ready when the forward side frees up
    # Histories per forward pass. The packed path (models/packed.py) computes no padding, so one pass per
    # batch is best; scorers without it pad each chunk to its longest history, and there chunks of ~8 were
    # best (ml-1m: median 96, a quarter at 200).
    FORWARD_CHUNK: int = 32
    # Where forward passes run: "process" (a child process: no GIL shared with the event loop) or "thread".
    FORWARD: Literal["process", "thread"] = "process"
    TORCH_THREADS: int = 0  # forward-pass threads; 0 = half the cores (the event loop needs the rest), >= 1
    ALIAS_TTL_S: float = 1.0  # an alias switched by another process shows here within 2x this (0: at once)

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        self.DATA_DIR = self.DATA_DIR.expanduser().resolve()
        if not self.DATABASE_URL:
            self.DATABASE_URL = f"sqlite:///{self.DATA_DIR / 'recmerge.db'}"
        if not self.STORE_URL:
            self.STORE_URL = f"file://{self.DATA_DIR / 'store'}"
        if self.MAX_UPLOAD_BYTES < 1:
            raise ValueError("MAX_UPLOAD_BYTES must be >= 1")
        if self.MODEL_CACHE_SIZE < 1:
            raise ValueError("MODEL_CACHE_SIZE must be >= 1")
        if self.BATCH_PIPELINE < 1 or self.BATCH_MAX < 1:
            raise ValueError("BATCH_PIPELINE and BATCH_MAX must be >= 1")
        return self

    @property
    def embedded(self) -> bool:
        """No broker: the API process runs the jobs itself and owns its schema."""
        return self.BROKER_URL is None

    @property
    def tmp_dir(self) -> Path:
        """Scratch space for uploads and half-written artifacts, on the same disk as the store."""
        return self.DATA_DIR / "tmp"

    @property
    def cache_dir(self) -> Path:
        """Local copies of remote artifacts (S3 store)."""
        return self.DATA_DIR / "cache"

    def torch_threads(self) -> int:
        return self.TORCH_THREADS or max(1, (os.cpu_count() or 2) // 2)


@lru_cache
def get_settings() -> Settings:
    return Settings()
