"""The forward side of serving: the child process answers exactly what the in-thread path answers,
comes back after being killed, passes bad-input errors through without dying; and the batcher keeps
two batches out at once so the forward side never waits for the event loop."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from app.inference import ForwardFailed, ForwardProcess, LocalForward, _child, make_forward
from app.serving import MicroBatcher
from core.settings import Settings
from models.errors import DataError
from tests.app.conftest import checkpoint_bytes

N_ITEMS = 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("inference")
    path = tmp / "m.safetensors"
    path.write_bytes(checkpoint_bytes(tmp, "f" * 64, N_ITEMS, seed=3))
    return str(path)


@pytest.fixture()
def child():
    forward = ForwardProcess(cache_size=2, threads=1, chunk=4)
    yield forward
    forward.close()


def _histories(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, N_ITEMS + 1, rng.integers(0, 30)) for _ in range(n)]


def test_process_answers_what_the_thread_answers(ckpt, child):
    histories = _histories(0, 11)  # lengths 0..29, beyond max_len 20 too; chunk 4 splits them unevenly
    want_items, want_scores = LocalForward(2, 1, 4).top_k("m", ckpt, histories, 7, N_ITEMS)
    items, scores = child.top_k("m", ckpt, histories, 7, N_ITEMS)
    assert items.shape == (11, 7) and scores.dtype == np.float32
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert child.pid is not None and child.pid != os.getpid()


def test_bad_history_is_a_data_error_and_the_child_lives_on(ckpt, child):
    child.top_k("m", ckpt, _histories(1, 2), 3, N_ITEMS)
    pid = child.pid
    with pytest.raises(DataError, match=f"history item {N_ITEMS + 5} is not an item id"):
        child.top_k("m", ckpt, [np.array([1, N_ITEMS + 5])], 3, N_ITEMS)
    items, _ = child.top_k("m", ckpt, [np.array([1, 2, 3])], 3, N_ITEMS)
    assert child.pid == pid and items.shape == (1, 3) and not set(items[0]) & {1, 2, 3}


def test_a_killed_child_is_replaced_and_the_batch_answered(ckpt, child):
    histories = _histories(2, 5)
    before, _ = child.top_k("m", ckpt, histories, 5, N_ITEMS)
    old = child.pid
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while child._proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    after, _ = child.top_k("m", ckpt, histories, 5, N_ITEMS)
    assert child.pid not in (None, old)
    np.testing.assert_array_equal(after, before)


def _many_calls(child, ckpt, n_calls: int, during=None) -> tuple[list, list]:
    """n_calls batches sent from 4 threads at once (so they queue in the pipe), with their expected
    answers from the in-thread path; `during` runs while they are in flight."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [_histories(100 + i, 1 + i % 7) for i in range(n_calls)]
    local = LocalForward(2, 1, 4)
    want = [local.top_k("m", ckpt, b, 5, N_ITEMS)[0] for b in batches]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(child.top_k, "m", ckpt, b, 5, N_ITEMS) for b in batches]
        if during:
            during()
        got = [f.result(timeout=120)[0] for f in futures]  # a lost answer fails, not hangs
    return got, want


def test_calls_queued_in_the_pipe_get_their_own_answers(ckpt, child):
    got, want = _many_calls(child, ckpt, 60)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_a_child_killed_with_calls_queued_is_replaced_and_every_call_answered(ckpt, child):
    child.top_k("m", ckpt, _histories(5, 1), 3, N_ITEMS)  # started and warm
    old = child.pid

    def kill_soon():
        time.sleep(0.05)
        os.kill(old, signal.SIGKILL)

    got, want = _many_calls(child, ckpt, 400, during=kill_soon)
    assert child.pid not in (None, old)  # the kill landed while calls were queued
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def _garbling_child(conn, *args) -> None:
    """A live child that answers its first batch with bytes the parent cannot read, then stays alive
    waiting; where RECMERGE_TEST_GARBLE_ONCE names a file that exists, a normal child instead. The first
    garbling child creates that file, so the replacement child serves."""
    once = os.environ.get("RECMERGE_TEST_GARBLE_ONCE")
    if once and os.path.exists(once):
        return _child(conn, *args)
    conn.recv_bytes(), conn.recv_bytes()  # one whole batch
    if once:
        open(once, "w").close()
        conn.send_bytes(b"\xff this is not JSON")
    else:  # valid JSON that promises a 2 x 3 answer, then too few bytes for it
        conn.send_bytes(b'{"ok": true, "shape": [2, 3]}')
        conn.send_bytes(b"\x00" * 8)
        conn.send_bytes(b"\x00" * 8)
    try:
        while conn.recv_bytes():  # alive until the parent gives up on it and closes the pipe
            pass
    except (EOFError, OSError):
        return


class _GarblingForward(ForwardProcess):
    child_main = staticmethod(_garbling_child)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started: list[int] = []  # the pid of every child started

    def _start(self):
        gen = super()._start()
        self.started.append(gen.proc.pid)
        return gen


def test_a_garbled_reply_from_a_live_child_fails_over_and_every_queued_call_is_answered(ckpt, tmp_path,
                                                                                     monkeypatch):
    marker = tmp_path / "garbled"
    monkeypatch.setenv("RECMERGE_TEST_GARBLE_ONCE", str(marker))
    forward = _GarblingForward(cache_size=2, threads=1, chunk=4)
    try:
        got, want = _many_calls(forward, ckpt, 40)
        assert marker.exists() and len(forward.started) == 2  # the first child did answer garbage...
        for g, w in zip(got, want):  # ...yet every call, queued behind it or not, got its own answer
            np.testing.assert_array_equal(g, w)
        first_replacement = forward.pid
        items, _ = forward.top_k("m", ckpt, _histories(7, 2), 5, N_ITEMS)
        assert forward.pid == first_replacement and items.shape == (2, 5)  # the replacement lives on
    finally:
        forward.close()


def test_a_child_that_always_garbles_gives_a_clear_error(ckpt, monkeypatch):
    monkeypatch.delenv("RECMERGE_TEST_GARBLE_ONCE", raising=False)
    forward = _GarblingForward(cache_size=2, threads=1, chunk=4)
    try:
        with pytest.raises(ForwardFailed, match="failed twice: the forward process stopped: ValueError"):
            forward.top_k("m", ckpt, _histories(8, 2), 5, N_ITEMS)
        assert len(set(forward.started)) == 2  # the retry went to a fresh child, not the one that garbled
    finally:
        forward.close()


def test_missing_checkpoint_names_the_file(tmp_path, child):
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(Exception, match="gone.safetensors"):
        child.top_k("gone", str(missing), _histories(3, 1), 3, N_ITEMS)


def test_make_forward_and_settings_refuse_unknown_values():
    with pytest.raises(ValueError, match="unknown forward kind 'gpu'"):
        make_forward("gpu", 1, 1, 8)
    with pytest.raises(ValueError, match="BATCH_PIPELINE"):
        Settings(BATCH_PIPELINE=0)
    with pytest.raises(ValueError):
        Settings(FORWARD="fork")


def _timed_batches(pipeline: int, arrivals: list[float]) -> tuple[list, list[tuple[float, float, int]], MicroBatcher]:
    """Requests x = 0, 1, ... arriving after the given delays; each batch sleeps 0.3 s and answers x + 1.
    Returns (answers, sorted (start, end, size) of every batch, the batcher)."""
    spans: list[tuple[float, float, int]] = []

    def run(batch):
        start = time.perf_counter()
        time.sleep(0.3)
        spans.append((start, time.perf_counter(), len(batch)))
        return [x + 1 for x in batch]

    batcher = MicroBatcher(run, max_batch=32, max_wait_s=0.001, pipeline=pipeline)

    async def call(x, delay):
        await asyncio.sleep(delay)
        with batcher.reserve():
            return await batcher.submit(x)

    async def go():
        return await asyncio.gather(*(call(x, d) for x, d in enumerate(arrivals)))

    answers = asyncio.run(go())
    batcher.close()
    return answers, sorted(spans), batcher


def test_two_batches_are_out_at_once():
    # the first request starts a batch alone; the next three arrive while it computes
    answers, spans, batcher = _timed_batches(2, [0, 0.1, 0.1, 0.1])
    assert answers == [1, 2, 3, 4]
    assert [n for _, _, n in spans] == [1, 3]
    assert spans[1][0] < spans[0][1]  # the second batch started before the first ended
    assert batcher.in_flight == 0


def test_one_batch_at_a_time_when_pipeline_is_one():
    answers, spans, _ = _timed_batches(1, [0, 0.1, 0.1])
    assert answers == [1, 2, 3]
    assert [n for _, _, n in spans] == [1, 2] and spans[1][0] >= spans[0][1]
