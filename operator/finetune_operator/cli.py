"""``finetune-operator``: run the operator (more subcommands are added as subparsers)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from .config import ConfigError, describe, load_config


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
    return parser


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
        print(f"{item['env']}  (default: {item['default']!r})\n    {item['help']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "config":
        return _config()
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
