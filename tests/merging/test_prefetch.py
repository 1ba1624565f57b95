"""The merge pass's read-ahead thread: results in order, a producer's error raised at its item, a consumer
that stops early stops the producer, and the producer never runs more than `ahead` + 1 items ahead."""

import threading

import pytest

from merging.prefetch import prefetched


def test_results_come_in_order_from_another_thread():
    threads = set()

    def produce(i):
        threads.add(threading.get_ident())
        return i * i

    with prefetched(produce, range(50)) as results:
        assert list(results) == [i * i for i in range(50)]
    assert threads and threading.get_ident() not in threads


def test_a_producer_error_is_raised_at_its_item():
    def produce(i):
        if i == 3:
            raise ValueError(f"bad block {i}")
        return i

    got = []
    with pytest.raises(ValueError, match="bad block 3"):
        with prefetched(produce, range(10)) as results:
            for r in results:
                got.append(r)
    assert got == [0, 1, 2]


@pytest.mark.parametrize("ahead", [1, 3])
def test_the_producer_stays_at_most_ahead_plus_one_items_in_front(ahead):
    produced, consumed, worst = [], [], [0]
    step = threading.Event()

    def produce(i):
        produced.append(i)
        worst[0] = max(worst[0], len(produced) - len(consumed))
        return i

    with prefetched(produce, range(30), ahead=ahead) as results:
        for r in results:
            step.wait(0.005)  # a slow consumer: the producer fills the queue and must wait
            consumed.append(r)
    assert consumed == list(range(30))
    # one being consumed (not yet counted), `ahead` queued, one made and waiting to be queued
    assert worst[0] == ahead + 2


def test_leaving_early_stops_the_producer_and_joins_it():
    produced = []
    with pytest.raises(RuntimeError, match="consumer failed"):
        with prefetched(produced.append, range(10_000)) as results:
            for i, _ in enumerate(results):
                if i == 5:
                    raise RuntimeError("consumer failed")
    n = len(produced)
    assert n < 20  # it stopped, a few items past the consumer at most
    assert not any(t.name == "recmerge-prefetch" for t in threading.enumerate())
    assert len(produced) == n


def test_ahead_must_be_positive():
    with pytest.raises(ValueError, match="ahead"):
        with prefetched(lambda i: i, range(3), ahead=0):
            pass
