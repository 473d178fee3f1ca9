"""``finetune-local``: the product on this machine, with no cluster (the demo, one local job)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-local", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="run the quickstart end to end on this machine (no cluster needed)"
    )
    demo.add_argument("--workdir", default=None, help="folder for the volumes and pods")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    demo.add_argument("--verbose", "-v", action="store_true", help="show operator logs")
    demo.add_argument(
        "--no-schedule", action="store_true", help="skip the FineTuneSchedule cycle at the end"
    )

    run = sub.add_parser(
        "run", help="validate, estimate, train, evaluate and gate a FineTuneJob manifest here"
    )
    run.add_argument("manifest", help="FineTuneJob YAML file")
    run.add_argument(
        "--pvc",
        action="append",
        default=[],
        metavar="CLAIM=DIR",
        help="map pvc://CLAIM/... to a local folder (repeatable)",
    )
    run.add_argument(
        "--output", default=None, help="output folder (default: the manifest's output.uri)"
    )
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import DemoOptions, run_cli

        workdir = Path(args.workdir) if args.workdir else None
        options = DemoOptions(
            workdir=workdir,
            keep=args.keep,
            verbose=args.verbose,
            schedule_cycle=not args.no_schedule,
        )
        return run_cli(options)
    if args.command == "run":
        from .localrun import run_cli as local_run

        return local_run(args.manifest, args.pvc, args.output, args.device)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
