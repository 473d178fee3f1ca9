"""API load of the AdapterDeployment controller: idle objects, and one canary.

Runs the real operator (the AdapterDeployment handlers, in this process, in local mode)
against the embedded API server, with emulated vLLM Deployments whose pods are local
reference servers, and counts the requests the API server receives:

1. ``--available`` AdapterDeployments rolled out and Available (one single-replica vLLM
   Deployment each), ``--pending`` waiting for a FineTuneJob that is still training and
   ``--failed`` refused for good (their target Deployment does not exist): once all have
   settled, requests per second over ``--window`` seconds in which nothing changes;
2. one canary (``--canary-checks`` checks ``--canary-interval`` seconds apart) of a new
   adapter on a two-replica Deployment: requests per second from the spec change until the
   new revision is Available.

Watch requests (long-lived streams kopf opens once and reopens when the server ends them)
are reported apart from the other requests. Settings come from the environment as in the
operator pod (``FINETUNE_SERVING_POLL_SECONDS`` etc.), so the script also runs against
other versions of the operator package (``PYTHONPATH``).

    python bench/bench_adapter_load.py --available 20 --pending 90 --failed 90 --window 30

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Local mode: pods are reached at their endpoint annotation, adapters are local folders.
os.environ.setdefault("FINETUNE_LOCAL_MODE", "true")
os.environ.setdefault("FINETUNE_POD_ENDPOINT_OVERRIDE", "annotation")  # older versions' name
os.environ.setdefault("FINETUNE_METRICS_PORT", "0")
REPO = Path(__file__).resolve().parents[1]
NS = "default"


def wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def counts(api: Any) -> tuple[int, int]:
    """(requests other than watches, watch requests) the API server answered so far."""
    watches = api.count("watch")
    return api.count() - watches, watches


def serving_objects() -> tuple[Any, Any]:
    """The test suite's builders of a vLLM Deployment and an AdapterDeployment."""
    from support.serving_env import adapter_deployment, vllm_deployment

    def deployment(name: str, replicas: int) -> dict[str, Any]:
        # a 60 s progress deadline: hundreds of Deployments start at once here
        return vllm_deployment(
            name, replicas=replicas, runtime_updates=False, progress_deadline_seconds=60
        )

    def adapter(name: str, source: dict[str, Any], target: str) -> dict[str, Any]:
        return adapter_deployment(name, source, target={"deployment": target, "container": "vllm"})

    return deployment, adapter


def training_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {},
        "status": {"phase": "Training", "conditions": []},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    import finetune_operator.handlers.adapterdeployment as handlers
    from finetune_local import Emulator, run_operator, serve
    from finetune_local.serving_cluster import ServingCluster
    from support.adapters import make_adapter

    vllm_deployment, adapter_deployment = serving_objects()

    root = Path(tempfile.mkdtemp(prefix="bench-adapter-load-"))
    api = Emulator()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "operator": str(Path(handlers.__file__).resolve().parents[2]),
        "poll_seconds": float(os.environ.get("FINETUNE_SERVING_POLL_SECONDS", "5")),
    }
    with (
        serve(api),
        ServingCluster(api, NS, root / "pvc", interval=0.2) as cluster,
        run_operator(api, handlers, namespaces=[NS]),
    ):
        uri1, d1 = make_adapter(root, "v1")
        uri2, d2 = make_adapter(root, "v2")
        source = {"uri": uri1, "digest": d1}
        for i in range(args.available):
            api.create(vllm_deployment(f"llm-{i}", 1))
            api.create(adapter_deployment(f"ready-{i}", source, f"llm-{i}"))
        for i in range(args.pending):
            api.create(training_job(f"tune-{i}"), keep_status=True)
            api.create(
                adapter_deployment(
                    f"pending-{i}", {"fineTuneJobRef": {"name": f"tune-{i}"}}, "llm-0"
                )
            )
        for i in range(args.failed):
            api.create(adapter_deployment(f"failed-{i}", source, "nowhere"))

        def phases() -> dict[str, int]:
            out: dict[str, int] = {}
            for obj in api.read_all("adapterdeployments", NS):
                phase = (obj.get("status") or {}).get("phase") or "none"
                out[phase] = out.get(phase, 0) + 1
            return out

        wanted = {"Available": args.available, "Pending": args.pending, "Failed": args.failed}
        wanted = {k: v for k, v in wanted.items() if v}
        settle_started = time.monotonic()
        wait(f"phases {wanted}", lambda: phases() == wanted, args.timeout)
        result["settle_seconds"] = round(time.monotonic() - settle_started, 1)
        time.sleep(args.quiet)  # the last writes' echoes
        before, watches_before = counts(api)
        time.sleep(args.window)
        after, watches_after = counts(api)
        result["idle"] = {
            "adapterdeployments": args.available + args.pending + args.failed,
            "phases": phases(),
            "window_seconds": args.window,
            "requests": after - before,
            "requests_per_second": round((after - before) / args.window, 3),
            "watch_requests": watches_after - watches_before,
        }
        if args.canary_checks:
            result["canary"] = canary(api, cluster, args, (uri1, d1), (uri2, d2))
    return result


def canary(
    api: Any, cluster: Any, args: argparse.Namespace, v1: tuple[str, str], v2: tuple[str, str]
) -> dict[str, Any]:
    vllm_deployment, adapter_deployment = serving_objects()

    def status() -> dict[str, Any]:
        return (api.read("adapterdeployments", NS, "canary") or {}).get("status") or {}

    api.create(vllm_deployment("llm-canary", 2))
    api.create(adapter_deployment("canary", {"uri": v1[0], "digest": v1[1]}, "llm-canary"))
    wait("the canary's first revision", lambda: status().get("phase") == "Available", 120)
    time.sleep(args.quiet)
    analysis = {
        "intervalSeconds": args.canary_interval,
        "checks": args.canary_checks,
        "smokeRequests": 2,
        "maxLatencyP95Ms": 60000,
    }
    before, watches_before = counts(api)
    started = time.monotonic()
    api.merge_patch(
        "adapterdeployments", NS, "canary",
        {"spec": {"source": {"uri": v2[0], "digest": v2[1]}, "strategy": {
            "type": "Canary", "canary": {"replicas": 1, "analysis": analysis},
            "progressDeadlineSeconds": 120}}},
    )  # fmt: skip
    wait(
        "the canary's promotion",
        lambda: (
            status().get("phase") == "Available"
            and (status().get("current") or {}).get("digest") == v2[1]
        ),
        60 + args.canary_checks * args.canary_interval * 3,
    )
    seconds = time.monotonic() - started
    after, watches_after = counts(api)
    return {
        "checks": args.canary_checks,
        "interval_seconds": args.canary_interval,
        "seconds_to_promotion": round(seconds, 1),
        "requests": after - before,
        "requests_per_second": round((after - before) / seconds, 3),
        "watch_requests": watches_after - watches_before,
        "checks_passed": (status().get("canary") or {}).get("checksPassed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--available", type=int, default=20)
    parser.add_argument("--pending", type=int, default=90)
    parser.add_argument("--failed", type=int, default=90)
    parser.add_argument("--window", type=float, default=30.0, help="idle seconds measured")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--canary-checks", type=int, default=3)
    parser.add_argument("--canary-interval", type=int, default=5)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
