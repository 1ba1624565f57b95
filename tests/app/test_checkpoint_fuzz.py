"""The lying-header corpus (tests/lying_headers.py) sent to POST /recipes: every file is refused within a
second, the server's memory stays bounded, nothing is stored and no scratch is left behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.app.conftest import checkpoint_bytes
from tests.lying_headers import lying_checkpoints

RSS_BOUND = 200 << 20  # the server's peak RSS may grow by this much over the whole corpus


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS counter (VmHWM) afresh, so the peak measured is this test's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def test_lying_headers_are_refused_fast_in_bounded_memory(svc, dataset, tmp_path):
    good = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"], layers=2)
    corpus = lying_checkpoints(good)
    assert len(corpus) > 80
    settings = svc.app.state.settings
    before = svc.snapshot()
    # Warm the route once (first multipart parse, first meta-device build) with a refused file.
    assert svc.upload_recipe(corpus[0][1], dataset["id"]).status_code == 422
    start_rss = _status_kib("VmRSS")
    peak_resettable = _reset_peak_rss()
    slow, accepted, leaks = [], [], []
    for name, content in corpus:
        t0 = time.perf_counter()
        r = svc.upload_recipe(content, dataset["id"], filename="lie.safetensors")
        elapsed = time.perf_counter() - t0
        if r.status_code not in (400, 422):
            accepted.append((name, r.status_code, r.text[:200]))
            continue
        if elapsed >= 1.0:
            slow.append((name, round(elapsed, 2)))
        detail = r.json()["detail"]
        if str(settings.DATA_DIR) in r.text or not detail.startswith("lie.safetensors: "):
            leaks.append((name, detail[:200]))  # a server path, or a message that does not name the upload
        peak = _status_kib("VmHWM" if peak_resettable else "VmRSS")
        assert peak - start_rss < RSS_BOUND, (name, peak - start_rss)
    assert accepted == []
    assert slow == []
    assert leaks == []
    assert svc.snapshot() == before  # no row, no store object, no scratch file
    assert list(settings.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("case", ["layers=1000000", "hidden=1e9,max_len=1e9", "int32-bias"])
def test_the_issues_cases_name_the_upload_and_the_problem(svc, dataset, tmp_path, case):
    good = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"], layers=2)
    content = dict(lying_checkpoints(good))[case]
    before = svc.snapshot()
    r = svc.upload_recipe(content, dataset["id"], filename="mine.safetensors")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("mine.safetensors: "), detail
    needle = {"layers=1000000": "backbone layers=1000000 cannot fit these tensors",
              "hidden=1e9,max_len=1e9": "backbone hidden=1000000000.0 is not an integer",
              "int32-bias": "tensor 'out_bias' has dtype I32"}[case]
    assert needle in detail
    assert svc.snapshot() == before
