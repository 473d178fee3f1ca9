"""Stopping the operator: every daemon returns as soon as it is asked, a pass under way
finishes its writes first, and kopf is left no task of the operator to kill (decision 2000)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kopf
import pytest
from finetune_local import Emulator
from finetune_local.serving_cluster import ServingCluster
from finetune_operator.clients.kube import KubeClient
from finetune_operator.handlers.daemon_stop import Daemons
from kopf._core.intents.stoppers import DaemonStopper  # the flag kopf hands each daemon
from support.adapters import make_adapter
from support.cluster import FAST, NS, add_prerequisites, ftj_body, start_pod, wait_job, wait_phase
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for
from support.serving_env import Env, adapter_deployment, uri_source, vllm_deployment

# Sleeps far longer than any test: a daemon that ends at a stop was woken by it.
HOUR = 3600.0


@pytest.fixture
def cluster(emulator: Emulator, tmp_path: Path) -> Iterator[ServingCluster]:
    with ServingCluster(emulator, NS, tmp_path / "pvc", lambda _d, _t: {}) as serving:
        yield serving


# The task kopf runs per watched resource (its watch stream, named "watcher for <resource>"):
# kopf's own connection to the API server. Under heavy CPU load one was seen to outlive the
# 5 s (its stream's context manager failed to close), never a task of the operator's.
KOPF_WATCHER = "watcher for "


def _record_hung_tasks(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """Each task that kopf had to stop after its 5 s grace: its name and innermost frames
    (kopf logs only that there were some); and the titles of kopf's stop calls, to show
    that the recording saw kopf's shutdown at all."""
    from kopf._cogs.aiokits import aiotasks

    hung: list[str] = []
    titles: list[str] = []
    stop = aiotasks.stop

    async def recording_stop(tasks: Any, *, title: str, **kwargs: Any) -> Any:
        titles.append(title)
        if title == "Hung":
            for task in tasks or ():
                frames = [f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack()[-3:]]
                hung.append(f"{task.get_name()} {frames}")
        return await stop(tasks, title=title, **kwargs)

    monkeypatch.setattr(aiotasks, "stop", recording_stop)
    return hung, titles


def test_every_daemon_returns_at_once_when_the_operator_stops(
    emulator: Emulator,
    operator_runner: Any,
    cluster: ServingCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A running job's poller and an AdapterDeployment's task both sleep for an hour; the
    stop comes right after edits of the AdapterDeployment, while kopf still handles their
    watch events (which makes kopf start the task anew after it stopped it)."""
    import finetune_operator.main  # noqa: F401  (every handler, as in the operator pod)

    hung, stop_titles = _record_hung_tasks(monkeypatch)
    config = replace(FAST, progress_poll_seconds=HOUR, unobserved_reconcile_seconds=HOUR)
    memo = kopf.Memo(config=config, kube=KubeClient.from_url(str(emulator.url)))
    run = operator_runner(memo=memo, namespaces=[NS])
    add_prerequisites(emulator)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    start_pod(emulator, wait_job(emulator, "bot-train-g1"))
    wait_phase(emulator, "bot", "Training")
    env = Env(emulator, cluster, tmp_path)
    uri, _ = make_adapter(env.root, "v1")
    emulator.create(vllm_deployment())
    emulator.create(adapter_deployment("support", uri_source(uri, "sha256:" + "0" * 64)))
    wait_for(lambda: env.condition("support", "SourceReady").get("status") == "False",
             what=lambda: f"the refusal of support: {env.status('support')}")  # fmt: skip

    daemons: Daemons = run.memo.daemons
    # both sleep before the stop comes (on a loaded machine a daemon may start late)
    wait_for(lambda: daemons.running >= 2, what=lambda: f"two daemons running: {vars(daemons)}")
    for touch in range(5):
        emulator.merge_patch("adapterdeployments", NS, "support",
                             {"metadata": {"labels": {"touch": str(touch)}}})  # fmt: skip
    run.stop()

    counts = {k: v for k, v in vars(daemons).items() if isinstance(v, int)}
    assert daemons.running == 0, counts
    assert daemons.cancelled == 0, f"a daemon had to be cancelled instead of returning: {counts}"
    assert daemons.returned >= 2, counts  # the poller and the AdapterDeployment's task at least
    # kopf had no task of the operator's (handler, daemon, worker) to kill after its grace
    assert "Hung" in stop_titles, stop_titles
    assert [t for t in hung if not t.startswith(KOPF_WATCHER)] == [], hung


def _stopped_by_nobody() -> kopf.DaemonStopped:
    """The stop flag of a daemon that kopf started while exiting: nobody ever sets it."""
    return DaemonStopper().async_waiter


def test_the_cleanup_stops_daemons_kopf_never_asked_and_lets_a_pass_finish() -> None:
    async def scenario() -> tuple[Daemons, list[str]]:
        daemons = Daemons()
        seen: list[str] = []
        pass_may_end = asyncio.Event()

        async def sleeper() -> None:
            flag = _stopped_by_nobody()
            with daemons.alive():
                while not daemons.asked_to_stop(flag):
                    await daemons.sleep(flag, HOUR)
                seen.append("sleeper returned")

        async def in_a_pass() -> None:
            with daemons.alive():
                await pass_may_end.wait()  # its writes, under way when the stop comes
                seen.append("pass finished")

        async def stuck() -> None:
            with daemons.alive():
                try:
                    await asyncio.sleep(HOUR)  # ignores every stop request
                except asyncio.CancelledError:
                    seen.append("stuck cancelled")
                    raise

        tasks = [asyncio.create_task(f()) for f in (sleeper, in_a_pass, stuck)]
        await asyncio.sleep(0)  # all three run
        stopping = asyncio.create_task(daemons.stop(grace=0.5))
        await asyncio.sleep(0.05)
        seen.append("pass may end")
        pass_may_end.set()
        await stopping
        await asyncio.gather(*tasks, return_exceptions=True)
        return daemons, seen

    daemons, seen = asyncio.run(scenario())
    assert seen == ["sleeper returned", "pass may end", "pass finished", "stuck cancelled"]
    assert (daemons.returned, daemons.cancelled, daemons.running) == (2, 1, 0)
    assert daemons.left_at_cleanup == 3


def test_kopf_stopping_a_daemon_wakes_its_sleep_at_once() -> None:
    async def scenario() -> tuple[Daemons, bool]:
        daemons = Daemons()
        stopper = DaemonStopper()

        async def daemon() -> None:
            with daemons.alive():
                await daemons.sleep(stopper.async_waiter, HOUR)

        task = asyncio.create_task(daemon())
        await asyncio.sleep(0)
        stopper.set(reason=kopf.DaemonStoppingReason.OPERATOR_EXITING)
        # kopf's default wait for a daemon to return by itself: a few loop cycles.
        for _ in range(10):
            await asyncio.sleep(0)
        return daemons, task.done()

    daemons, returned_by_itself = asyncio.run(scenario())
    assert returned_by_itself
    assert (daemons.returned, daemons.cancelled) == (1, 0)


def test_a_stop_does_not_cut_an_adapterdeployment_pass() -> None:
    """kopf cancels a task that does not return within its wait; the pass it was in still
    makes its status write, and the cleanup closes the HTTP session only after it."""
    from finetune_operator.handlers.adapterdeployment import ServingState, release_serving

    async def scenario() -> tuple[list[str], bool, bool]:
        state = ServingState()
        seen: list[str] = []
        may_write = asyncio.Event()

        async def one_pass() -> None:
            await may_write.wait()
            seen.append("status written" if not state.stopping else "written after close")

        task = asyncio.create_task(state.run_pass(one_pass()))
        await asyncio.sleep(0)
        task.cancel()  # as kopf does
        cleanup = asyncio.create_task(release_serving(kopf.Memo(serving=state)))
        await asyncio.sleep(0.05)
        seen.append("cleanup waits" if not cleanup.done() else "cleanup did not wait")
        may_write.set()
        await cleanup
        await asyncio.gather(task, return_exceptions=True)
        return seen, task.cancelled(), state.stopping

    seen, cancelled, closed = asyncio.run(scenario())
    assert seen == ["cleanup waits", "status written"]
    assert cancelled and closed
