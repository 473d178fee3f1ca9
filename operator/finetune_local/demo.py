"""``finetune-local demo``: the whole product on this machine, with no cluster.

It builds the tiny model and the sample data into a local "PVC", starts the embedded
Kubernetes API (with the CRDs), the real operator, and the local executor (Jobs run as
processes, vLLM Deployments as reference servers), then applies the quickstart manifests
exactly as a user would: the serving Deployment, the FineTuneJob and the
AdapterDeployment. It shows training progress live, then the final tables, the gate
results, the adapter digest (checked against the files on disk) and a chat completion
answered with the new adapter. Then one FineTuneSchedule cycle (``demo_schedule``): the
training file changes, a run beats the champion on the same eval rows, and the
AdapterDeployment following the schedule canaries and promotes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml
from finetune_operator.domain.times import parse_rfc3339
from finetune_operator.domain.uris import StorageUri

from .demo_schedule import CycleFailed, CycleResult, run_cycle

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "quickstart"
CRD_DIR = REPO_ROOT / "crds"
CLAIM = "finetune-quickstart"
MODEL_SUBDIR = "models/tiny-llama"
DATA_SUBDIR = "data/train.jsonl"
# Output-head weights large enough that a LoRA adapter can reach confident answers on
# the tiny random model within the quickstart's few dozen CPU steps.
TINY_MODEL_INIT_RANGE = 0.3


class DemoFailed(RuntimeError):
    """The demo could not finish; the message says where and why."""


@dataclass
class DemoResult:
    finetunejob: dict[str, Any]
    adapterdeployment: dict[str, Any]
    digest_on_disk: str
    models: list[str]
    prompt: str
    answer: str
    reference: str
    seconds: float
    workdir: Path
    # The FineTuneSchedule cycle (None with schedule_cycle off).
    cycle: CycleResult | None = None


@dataclass
class DemoOptions:
    workdir: Path | None = None
    keep: bool = False
    namespace: str = "default"
    timeout_seconds: float = 1800.0
    out: TextIO = field(default_factory=lambda: sys.stdout)
    live: bool | None = None  # None: a refreshed table on a terminal, lines otherwise
    verbose: bool = False
    # Called with (serving endpoint, embedded API) while everything still runs (tests).
    on_served: Callable[[str, Any], None] | None = None
    # Also show one FineTuneSchedule cycle after the quickstart (two more small CPU runs).
    schedule_cycle: bool = True


# ---------------------------------------------------------------- pure helpers


def json_path(obj: Mapping[str, Any], path: str) -> Any:
    """Value of a simple printer-column JSONPath (``.status.progress.loss``)."""
    value: Any = obj
    for part in path.strip(".").split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def age(timestamp: str | None, now: float | None = None) -> str:
    then = parse_rfc3339(timestamp)
    if then is None:
        return "<unknown>"
    seconds = int((now or time.time()) - then.timestamp())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60}s" if seconds < 600 else f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "<none>"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A kubectl-style table: upper-case headers, columns padded by three spaces."""
    cells = [[h.upper() for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def printer_columns(crd_file: Path) -> list[tuple[str, str]]:
    """(name, jsonPath) of a CRD's printer columns, as ``kubectl get`` shows them."""
    crd = yaml.safe_load(crd_file.read_text(encoding="utf-8"))
    version = crd["spec"]["versions"][0]
    return [(c["name"], c["jsonPath"]) for c in version.get("additionalPrinterColumns") or []]


def kubectl_table(
    objects: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], resource: str = ""
) -> str:
    """Rows like ``kubectl get``; ``resource`` (``finetunejob.finetune.dev``) prefixes names
    as kubectl does when one command lists several kinds."""
    rows = []
    for obj in objects:
        name = obj["metadata"]["name"]
        row: list[Any] = [f"{resource}/{name}" if resource else name]
        for name, path in columns:
            value = json_path(obj, path)
            row.append(age(value) if name == "Age" else value)
        rows.append(row)
    return format_table(["NAME", *[name for name, _ in columns]], rows)


def progress_row(ftj: Mapping[str, Any], adep: Mapping[str, Any] | None) -> list[Any]:
    status = ftj.get("status") or {}
    progress = status.get("progress") or {}
    step = progress.get("step")
    total = progress.get("totalSteps")
    loss = progress.get("loss")
    tps = progress.get("tokensPerSecond")
    eta = progress.get("etaSeconds")
    return [
        ftj["metadata"]["name"],
        status.get("phase") or "Pending",
        f"{step}/{total}" if step is not None and total else None,
        f"{loss:.3f}" if isinstance(loss, int | float) else None,
        f"{tps:.0f}" if isinstance(tps, int | float) else None,
        f"{eta}s" if eta is not None else None,
        ((adep or {}).get("status") or {}).get("phase") or "Waiting",
    ]


PROGRESS_HEADERS = ["FINETUNEJOB", "PHASE", "STEP", "LOSS", "TOKENS/S", "ETA", "ADAPTERDEPLOYMENT"]


def condition(obj: Mapping[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def failure_message(obj: Mapping[str, Any]) -> str:
    """The reason and message of a failed object's most telling condition."""
    for type_ in ("Failed", "Degraded", "Ready", "Available", "GatesPassed"):
        cond = condition(obj, type_)
        if cond and cond.get("status") in ("True", "False") and cond.get("message"):
            if type_ in ("Failed", "Degraded") and cond["status"] != "True":
                continue
            return f"{cond.get('reason')}: {cond.get('message')}"
    return "no condition explains it"


# ---------------------------------------------------------------- the run


def prepare_volume(workdir: Path) -> Path:
    """Fill the quickstart PVC folder: the tiny model and the sample data."""
    from finetune_trainer.tinymodel import build_tiny_model
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    claim = workdir / "pvc" / CLAIM
    model_dir = claim / MODEL_SUBDIR
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, initializer_range=TINY_MODEL_INIT_RANGE)
    data = claim / DATA_SUBDIR
    data.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLES / "train.jsonl", data)
    return claim


def load_manifests(path: Path, namespace: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    for doc in docs:
        doc.setdefault("metadata", {})["namespace"] = namespace
    return docs


def _configure_fast_local_settings() -> None:
    """Quick polling for a demo; must run before the operator's modules are imported."""
    os.environ.setdefault("FINETUNE_PROGRESS_POLL_SECONDS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _http_json(url: str, body: Mapping[str, Any] | None = None, timeout: float = 120.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json"},
        method="POST" if data else "GET",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # local 127.0.0.1 only
        return json.loads(response.read().decode())


class _Display:
    """Live progress: a table redrawn in place on a terminal, changed lines otherwise."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out, self.live = out, live
        self._drawn_lines = 0
        self._last = ""

    def show(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self.live:
            if self._drawn_lines:
                self.out.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self.out.write(text + "\n")
            self._drawn_lines = text.count("\n") + 1
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def progress(self, ftj: Mapping[str, Any], adep: Mapping[str, Any] | None) -> None:
        row = progress_row(ftj, adep)
        if self.live:
            self.show(format_table(PROGRESS_HEADERS, [row]))
        else:
            self.show(
                f"  phase={row[1]} step={_cell(row[2])} loss={_cell(row[3])} "
                f"tokens/s={_cell(row[4])} eta={_cell(row[5])} adapterdeployment={row[6]}"
            )


def _wait(
    what: str, check: Callable[[], Any], deadline: float, on_tick: Callable[[], None] | None = None
) -> Any:
    while True:
        value = check()
        if value:
            return value
        if on_tick is not None:
            on_tick()
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for {what}")
        time.sleep(0.5)


@contextlib.contextmanager
def _workdir(options: DemoOptions) -> Iterator[Path]:
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        yield options.workdir.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="finetune-demo-"))
    try:
        yield path
    finally:
        if not options.keep:
            shutil.rmtree(path, ignore_errors=True)


def _trainer_pods_summary(api: Any, namespace: str, ftj: dict[str, Any]) -> str:
    """The trainer pods' phases, termination messages and last log lines, for a failure."""
    job = (ftj.get("status") or {}).get("trainerJob")
    if not job:
        return ""
    parts = []
    for pod in api.read_all("pods", namespace, f"job-name={job}"):
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        states = [
            (c.get("name"), (c.get("state") or {}).get("terminated"))
            for c in status.get("containerStatuses") or []
        ]
        tail = api.pod_log(namespace, name, tail_lines=8).rstrip()
        parts.append(f"\n  pod {name}: phase {status.get('phase')}, {states}\n{tail}")
    return "".join(parts) or f"\n  no pods of Job {job}"


def run_demo(options: DemoOptions) -> DemoResult:
    """Run the embedded end-to-end flow; raises :class:`DemoFailed` with the reason."""
    _configure_fast_local_settings()
    import logging

    logging.basicConfig(
        level=logging.INFO if options.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not options.verbose:
        for noisy in ("kopf", "aiohttp", "finetune_operator"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    with _workdir(options) as workdir:
        return _run(options, workdir)


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _run(options: DemoOptions, workdir: Path) -> DemoResult:
    import kopf
    from finetune_operator.clients.kube import KubeClient
    from finetune_operator.config import load_config
    from finetune_operator.domain.adapter_digest import verify_directory
    from finetune_operator.serving.serving_config import annotation_endpoint

    from .emulator import Emulator, serve
    from .executor import LocalExecutor
    from .runner import module_registry, run_operator, test_settings

    out, ns = options.out, options.namespace
    live = options.live if options.live is not None else out.isatty()
    started = time.monotonic()
    deadline = started + options.timeout_seconds

    _say(out, f"==> preparing the quickstart volume in {workdir / 'pvc' / CLAIM}")
    claim_dir = prepare_volume(workdir)

    _say(out, "==> starting the embedded Kubernetes API, the operator and the local executor")
    api = Emulator(crd_dir=CRD_DIR, validate_schemas=True)
    import finetune_operator.main  # noqa: F401  (registers the handlers)
    from finetune_operator.handlers import adapterdeployment, finetunejob, finetuneschedule

    config = load_config()
    memo_config = dataclasses.replace(
        config,
        progress_poll_seconds=1.0,
        progress_interval_seconds=1.0,
        metrics_port=0,
        operator_namespace=ns,
        # The serving pods are local servers on their own ports, reached through the
        # endpoint annotation the executor writes, and the adapter is a local folder.
        local_mode=True,
        serving_poll_seconds=min(config.serving_poll_seconds, 0.5),
    )
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve(api))
        memo = kopf.Memo(config=memo_config, kube=KubeClient.from_url(server.url))
        # Exactly the operator's handlers, whatever else this process has imported.
        registry = module_registry(finetunejob, adapterdeployment, finetuneschedule)
        stack.enter_context(
            run_operator(server, registry, memo=memo, namespaces=[ns], settings=test_settings())
        )
        executor = stack.enter_context(LocalExecutor(api, workdir, namespace=ns))

        _say(
            out,
            "==> kubectl apply -f examples/quickstart/ (pvc, serving, finetunejob, adapterdeployment)",
        )
        for doc in load_manifests(EXAMPLES / "pvc.yaml", ns):
            doc["status"] = {"phase": "Bound"}
            api.create(doc)
        for name in ("serving.yaml", "finetunejob.yaml", "adapterdeployment.yaml"):
            for doc in load_manifests(EXAMPLES / name, ns):
                api.create(doc, keep_status=False)
        ftj_name = load_manifests(EXAMPLES / "finetunejob.yaml", ns)[0]["metadata"]["name"]
        adep_name = load_manifests(EXAMPLES / "adapterdeployment.yaml", ns)[0]["metadata"]["name"]

        _say(out, "==> training (the trainer runs as a local process of the trainer Job's pod)")
        display = _Display(out, live)

        def ftj() -> dict[str, Any]:
            return api.read("finetunejobs", ns, ftj_name) or {}

        def adep() -> dict[str, Any]:
            return api.read("adapterdeployments", ns, adep_name) or {}

        def check_errors() -> None:
            if executor.errors:
                raise DemoFailed(f"the local executor failed: {executor.errors[0]}")

        def training_done() -> dict[str, Any] | None:
            check_errors()
            current = ftj()
            display.progress(current, adep())
            phase = (current.get("status") or {}).get("phase")
            return current if phase in ("Succeeded", "Failed") else None

        final_ftj = _wait("the FineTuneJob to finish", training_done, deadline)
        if final_ftj["status"]["phase"] != "Succeeded":
            raise DemoFailed(
                f"FineTuneJob {ftj_name} failed: {failure_message(final_ftj)}"
                + _trainer_pods_summary(api, ns, final_ftj)
            )
        gates_ok = condition(final_ftj, "GatesPassed")
        if not gates_ok or gates_ok.get("status") != "True":
            raise DemoFailed(f"FineTuneJob {ftj_name}: quality gates did not pass: "
                             f"{(gates_ok or {}).get('message')}")  # fmt: skip

        _say(out, "==> rolling the adapter into the tiny-llama Deployment")

        def rolled_out() -> dict[str, Any] | None:
            check_errors()
            current = adep()
            display.progress(final_ftj, current)
            if (condition(current, "Degraded") or {}).get("status") == "True":
                raise DemoFailed(
                    f"AdapterDeployment {adep_name} degraded: {failure_message(current)}"
                )
            return (
                current if (condition(current, "Available") or {}).get("status") == "True" else None
            )

        final_adep = _wait("the AdapterDeployment to become Available", rolled_out, deadline)

        adapter = final_ftj["status"]["adapter"]
        adapter_dir = claim_dir / StorageUri.parse(adapter["uri"]).path
        digest_on_disk = verify_directory(adapter_dir)

        # Ask a serving replica for a completion with the new adapter.
        pods = [p for p in api.read_all("pods", ns, "app=tiny-llama")
                if (condition(p, "Ready") or {}).get("status") == "True"]  # fmt: skip
        if not pods:
            raise DemoFailed("no serving pod of tiny-llama is Ready")
        endpoint = annotation_endpoint(pods[0], 8000)
        if endpoint is None:
            raise DemoFailed(f"serving pod {pods[0]['metadata']['name']} has no endpoint")
        adapter_name = final_adep["spec"]["adapterName"]
        models = [m["id"] for m in _http_json(f"{endpoint}/v1/models")["data"]]
        row = json.loads((claim_dir / "adapters/quickstart/eval.jsonl").read_text().splitlines()[0])
        reply = _http_json(
            f"{endpoint}/v1/chat/completions",
            {"model": adapter_name, "messages": row["messages"], "max_tokens": 32},
        )
        answer = reply["choices"][0]["message"]["content"]
        prompt = str(row["messages"][-1]["content"])
        if options.on_served is not None:
            options.on_served(endpoint, api)

        ftj_columns = printer_columns(CRD_DIR / "finetunejobs.yaml")
        adep_columns = printer_columns(CRD_DIR / "adapterdeployments.yaml")
        _say(out, "\n$ kubectl get finetune")
        _say(out, kubectl_table([final_ftj], ftj_columns, "finetunejob.finetune.dev"))
        _say(out, "")
        _say(out, kubectl_table([adep()], adep_columns, "adapterdeployment.finetune.dev"))
        _say(out, "\nQuality gates:")
        gate_rows = [
            [
                g.get("metric"),
                g.get("threshold"),
                g.get("value"),
                "yes" if g.get("passed") else "NO",
            ]
            for g in final_ftj["status"].get("gates") or []
        ]
        _say(out, format_table(["metric", "threshold", "value", "passed"], gate_rows))
        _say(out, f"\nAdapter:  {adapter['uri']}")
        _say(out, f"Digest:   {adapter['digest']} (status)")
        _say(out, f"          {digest_on_disk} (files on disk, verified)")
        if digest_on_disk != adapter["digest"]:
            raise DemoFailed("the adapter files on disk do not match the digest in status")
        _say(out, f"\nServed models ({endpoint}/v1/models): {', '.join(models)}")
        _say(out, f'POST /v1/chat/completions model="{adapter_name}"')
        _say(out, f"  prompt:    {prompt}")
        _say(out, f"  answer:    {answer}")
        _say(out, f"  reference: {row['completion']}")
        cycle = None
        if options.schedule_cycle:
            try:
                cycle = run_cycle(api, claim_dir, CLAIM, EXAMPLES, ns, out, deadline, check_errors)
            except CycleFailed as exc:
                raise DemoFailed(f"schedule cycle: {exc}") from exc
            _say(out, f"\nSchedule cycle in {cycle.seconds:.0f}s.")
        seconds = time.monotonic() - started
        _say(out, f"\nDone in {seconds:.0f}s. Files: {workdir}")
        return DemoResult(
            finetunejob=final_ftj,
            adapterdeployment=adep(),
            digest_on_disk=digest_on_disk,
            models=models,
            prompt=prompt,
            answer=answer,
            reference=str(row["completion"]),
            seconds=seconds,
            workdir=workdir,
            cycle=cycle,
        )


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="finetune-local demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--verbose", "-v", action="store_true", help="operator logs too")
    parser.add_argument(
        "--no-schedule", action="store_true", help="skip the FineTuneSchedule cycle at the end"
    )
    args = parser.parse_args(argv)
    options = DemoOptions(workdir=args.workdir, keep=args.keep, verbose=args.verbose,
                          schedule_cycle=not args.no_schedule)  # fmt: skip
    return run_cli(options)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_cli(options: DemoOptions) -> int:
    import signal

    # A terminated demo still stops its trainer and server processes on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_demo(options)
    except DemoFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
