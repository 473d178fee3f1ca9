"""The operator's daemons stop as soon as they are asked to, and none outlives the operator.

kopf asks a daemon to stop by setting its ``stopped`` flag; a daemon that sleeps wakes on
that flag at once rather than at its next check. When the operator exits, kopf stops the
daemons it knows, but watch events still queued at that moment can start new daemons
afterwards that kopf never asks to stop: it waits a fixed 5 s for such "hung" tasks before
it cancels them. The operator's cleanup asks those to stop too (decision 2000).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import kopf

# How long the cleanup lets daemons still running finish their pass before it cancels them.
STOP_GRACE_SECONDS = 5.0


class Daemons:
    """The daemon tasks of one operator run (in kopf's memo, made at startup)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()  # the operator's cleanup has begun
        self._tasks: set[asyncio.Task[Any]] = set()
        # How the daemons ended, for logs and tests: returned when asked, or cancelled.
        self.returned = 0
        self.cancelled = 0
        self.left_at_cleanup = 0  # still running when the cleanup began: kopf never stopped them

    @property
    def running(self) -> int:
        return len(self._tasks)

    def asked_to_stop(self, stopped: kopf.DaemonStopped) -> bool:
        return bool(stopped) or self.stopping.is_set()

    @contextlib.contextmanager
    def alive(self) -> Iterator[None]:
        """Around a daemon's body: the cleanup knows it runs until it ends."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a daemon runs in a task")
        self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        else:
            self.returned += 1
        finally:
            self._tasks.discard(task)

    async def sleep(
        self, stopped: kopf.DaemonStopped, seconds: float | None, wake: asyncio.Event | None = None
    ) -> None:
        """Until ``seconds`` passed (None: no limit), ``wake`` is set, or the daemon is asked
        to stop (by kopf or by the cleanup), whichever comes first."""
        if self.asked_to_stop(stopped) or (wake is not None and wake.is_set()):
            return
        if seconds is not None and seconds <= 0:
            return
        # stopped.wait() without a time limit: its inner task then never ends in TimeoutError,
        # which kopf would report as a crash of the operator if it happened while exiting.
        waits = [
            asyncio.ensure_future(_until_stopped(stopped)),
            asyncio.ensure_future(self.stopping.wait()),
        ]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        try:
            done, _ = await asyncio.wait(
                waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
            for ended in done:
                ended.result()  # a wait that failed raises here rather than end every sleep
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.wait(waits)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Ask every daemon still running to stop, wait for them up to ``grace`` seconds (a
        pass under way finishes its writes), then cancel what is left."""
        if not self.stopping.is_set():
            self.left_at_cleanup = len(self._tasks)
            self.stopping.set()
        left = set(self._tasks)
        if left:
            _, left = await asyncio.wait(left, timeout=grace)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=grace)


async def _until_stopped(stopped: kopf.DaemonStopped) -> None:
    await stopped.wait()


def start_daemons(memo: kopf.Memo) -> Daemons:
    """The run's daemon registry, made at startup (kopf gives each object a shallow copy of
    the memo, so one made later would not be shared). A memo reused by a later run gets a
    fresh one."""
    current = getattr(memo, "daemons", None)
    if not isinstance(current, Daemons) or current.loop is not asyncio.get_running_loop():
        current = Daemons()
        memo.daemons = current
    return current


def daemons_of(memo: kopf.Memo) -> Daemons:
    current = getattr(memo, "daemons", None)
    if not isinstance(current, Daemons):
        raise kopf.TemporaryError("operator is still starting", delay=1)
    return current


async def stop_daemons(memo: kopf.Memo) -> None:
    """For the cleanup handlers: stop the daemons kopf left running (see the module doc)."""
    current = getattr(memo, "daemons", None)
    if isinstance(current, Daemons):
        await current.stop()
