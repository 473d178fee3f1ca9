"""One lock per object, for controllers whose handlers, timers and watch events race."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ObjectLocks:
    """Serialises the reconciles of each (namespace, name).

    Holds only what is in flight: an object's lock exists while a reconcile of it runs or
    waits, so memory does not grow with the number of objects ever seen. Made per operator
    run (in kopf's memo), so that the locks belong to that run's event loop.
    """

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def held(self, namespace: str, name: str) -> AsyncIterator[None]:
        key = (namespace, name)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        """Objects with a reconcile running or waiting."""
        return len(self._locks)
