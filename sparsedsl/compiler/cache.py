"""A bounded, thread-safe build cache: each key is built once, even when several threads
ask for it at the same time; other keys build concurrently."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")
_MISSING = object()


class BuildCache:
    """Least-recently-used cache of at most ``maxsize`` built values."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._values: OrderedDict[Hashable, object] = OrderedDict()
        self._building: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The value cached under ``key``, built by ``build()`` on the first request."""
        with self._lock:
            value = self._values.get(key, _MISSING)
            if value is not _MISSING:
                self._values.move_to_end(key)
                return value  # type: ignore[return-value]
            key_lock = self._building.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._values:
                    return self._values[key]  # type: ignore[return-value]
            value = build()
            with self._lock:
                self._values[key] = value
                self._building.pop(key, None)
                while len(self._values) > self.maxsize:
                    self._values.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def __len__(self) -> int:
        return len(self._values)
