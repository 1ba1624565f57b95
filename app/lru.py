"""A thread-safe LRU map whose misses are filled by a loader (models and datasets being served)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable


class LRUCache:
    """Thread-safe LRU map whose misses are filled by a loader, one load at a time."""

    def __init__(self, size: int, on_lookup: Callable[[str], None] | None = None):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # two requests missing the same model load it once
        self._on_lookup = on_lookup or (lambda result: None)

    def peek(self, key):
        """The cached value or None, without loading: safe to call on the event loop."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self._on_lookup("hit")
            return value

    def get(self, key, load: Callable):
        if (value := self.peek(key)) is not None:
            return value
        with self._load_lock:
            if (value := self.peek(key)) is not None:
                return value
            self._on_lookup("miss")
            value = load(key)
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return value

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items
