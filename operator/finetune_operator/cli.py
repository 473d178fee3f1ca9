"""``finetune-operator``: run the operator, inspect vLLM servers, run the demo or a local job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .config import ConfigError, describe, load_config

if TYPE_CHECKING:
    import kopf


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator (kopf) against the current cluster")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable; glob patterns allowed)",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch every namespace (default)"
    )
    run.add_argument("--peering", default=None, help="kopf peering object name (HA: one active)")
    run.add_argument("--standalone", action="store_true", help="ignore peering and other operators")
    run.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="serve a liveness endpoint, e.g. http://0.0.0.0:8081/healthz",
    )
    run.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    sub.add_parser("config", help="list the environment variables the operator reads")

    inspect = sub.add_parser(
        "inspect-server",
        help="print what the operator reads from vLLM Deployments (one JSON line each)",
        description=(
            "Read Deployment manifests (multi-document YAML; ConfigMaps in the same files "
            "feed --config and env) and print, per Deployment, one JSON line with what the "
            "operator and vLLM will believe about its vLLM server. Exit status: 0 when every "
            "Deployment runs vLLM without problems, 1 when one has problems or runs no vLLM "
            "server, 2 when a file cannot be read."
        ),
    )
    inspect.add_argument("files", nargs="+", metavar="FILE", help="manifest file ('-': stdin)")
    inspect.add_argument(
        "--container", default=None, help="read this container (default: the one running vLLM)"
    )
    inspect.add_argument(
        "--image-pattern",
        action="append",
        default=None,
        metavar="PATTERN",
        help="fnmatch pattern of vLLM images whose entry point runs the server (repeatable; "
        "default: FINETUNE_VLLM_IMAGE_PATTERNS)",
    )
    cleanup = sub.add_parser(
        "cleanup",
        help="remove the operator's finalizer from FineTuneJobs, AdapterDeployments and "
        "FineTuneSchedules once the operator is uninstalled (docs/install.md, Uninstall)",
    )
    cleanup.add_argument(
        "--namespace", "-n", action="append", default=[], help="only this namespace (repeatable)"
    )
    cleanup.add_argument(
        "--all",
        action="store_true",
        help="also from objects not being deleted (before deleting the CRDs)",
    )
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would change")
    cleanup.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube)"
    )

    demo = sub.add_parser(
        "demo", help="run the quickstart end to end on this machine (no cluster needed)"
    )
    demo.add_argument("--workdir", default=None, help="folder for the volumes and pods")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    demo.add_argument("--verbose", "-v", action="store_true", help="show operator logs")
    demo.add_argument(
        "--no-schedule", action="store_true", help="skip the FineTuneSchedule cycle at the end"
    )

    local = sub.add_parser("local", help="run a FineTuneJob on this machine without a cluster")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    local_run = local_sub.add_parser(
        "run", help="validate, estimate, train, evaluate and gate a FineTuneJob manifest here"
    )
    local_run.add_argument("manifest", help="FineTuneJob YAML file")
    local_run.add_argument(
        "--pvc",
        action="append",
        default=[],
        metavar="CLAIM=DIR",
        help="map pvc://CLAIM/... to a local folder (repeatable)",
    )
    local_run.add_argument(
        "--output", default=None, help="output folder (default: the manifest's output.uri)"
    )
    local_run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


# Characters of kopf's namespace patterns (globs, negation, lists): not an exact name.
NAMESPACE_PATTERN_CHARS = frozenset("*?[]!,")


def operator_settings(namespaces: Sequence[str]) -> kopf.OperatorSettings:
    """kopf settings of the operator process for the namespaces it watches (empty: all).

    Limited to exact namespace names, the operator has no cluster-wide access (the chart
    grants Roles only), so kopf's scanning must be off: it would list and watch namespaces and
    CRDs cluster-wide and retry each refusal for about a minute before it handled anything
    (decision 1701). Patterns need the namespace list: kopf keeps scanning for them.
    """
    import kopf

    settings = kopf.OperatorSettings()
    settings.scanning.disabled = bool(namespaces) and not any(
        NAMESPACE_PATTERN_CHARS & set(namespace) for namespace in namespaces
    )
    return settings


def _run(args: argparse.Namespace) -> int:
    import kopf

    try:
        config = load_config()
    except ConfigError as exc:
        print(f"finetune-operator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    namespaces: list[str] = list(args.namespace) or list(config.watch_namespaces)
    import finetune_operator.main  # noqa: F401  (registers the handlers)

    memo = kopf.Memo(config=config)
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            settings=operator_settings(namespaces),
            priority=0,
            peering_name=args.peering,
            standalone=args.standalone or args.peering is None,
            liveness_endpoint=args.liveness,
            memo=memo,
        )
    )
    return 0


def _config() -> int:
    for item in describe():
        default = item["default"]
        if isinstance(default, tuple):  # lists are written comma-separated, as in the variable
            default = ",".join(default)
        print(f"{item['env']}  (default: {default!r})\n    {item['help']}")
    return 0


def _inspect_server(args: argparse.Namespace) -> int:
    from .inspect_server import run

    patterns = args.image_pattern
    if patterns is None:
        try:
            patterns = list(load_config().vllm_image_patterns)
        except ConfigError as exc:
            print(f"finetune-operator: {exc}", file=sys.stderr)
            return 2
    return run(args.files, container=args.container, image_patterns=patterns)


def _cleanup(args: argparse.Namespace) -> int:
    from .cleanup import release_finalizers
    from .clients.kube import KubeClient, KubeError, api_client_from_environment

    if args.kubeconfig:
        from kubernetes import config as kube_config

        kube = KubeClient(kube_config.new_client_from_config(config_file=args.kubeconfig))
    else:
        kube = KubeClient(api_client_from_environment())

    async def release() -> int:
        try:
            released = await release_finalizers(
                kube, args.namespace, include_live=args.all, dry_run=args.dry_run
            )
        except KubeError as exc:
            print(f"finetune-operator cleanup: {exc}", file=sys.stderr)
            return 1
        finally:
            await kube.close()
        for item in released:
            print(item.line(args.dry_run))
        print(f"{len(released)} object(s) {'to release' if args.dry_run else 'released'}")
        return 0

    return asyncio.run(release())


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "config":
        return _config()
    if args.command == "inspect-server":
        return _inspect_server(args)
    if args.command == "cleanup":
        return _cleanup(args)
    if args.command == "demo":
        from pathlib import Path

        from .local.demo import DemoOptions, run_cli

        workdir = Path(args.workdir) if args.workdir else None
        options = DemoOptions(workdir=workdir, keep=args.keep, verbose=args.verbose,
                              schedule_cycle=not args.no_schedule)  # fmt: skip
        return run_cli(options)
    if args.command == "local":
        from .local.localrun import run_cli as local_run

        return local_run(args.manifest, args.pvc, args.output, args.device)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
