"""The operator under tracemalloc, for ``bench_scale.py --tracemalloc``.

On SIGUSR1 it collects garbage, then writes next to ``$FINETUNE_BENCH_SNAPSHOT``:

- ``<path>.json``: the process's RSS; Python's small-object allocator (arenas held, bytes
  in live blocks, bytes free inside the arenas: memory the process keeps but no object
  uses); and what holds memory per object: kopf's record of each object and the bodies
  kopf keeps of objects of a kind that has daemons, each kopf index beyond those bodies,
  the per-job phase series. Each object is counted once, in that order;
- ``<path>``: a tracemalloc snapshot, when tracing (the allocator's figures are then
  unavailable: tracemalloc wraps it);
- ``<path>.done`` last, when the others are written.

    python -X tracemalloc=1 bench/traced_operator.py run --all-namespaces
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import signal
import sys
import tempfile
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Lines of sys._debugmallocstats() kept, by the name given to them here.
ALLOCATOR_LINES = {
    "arenas": r"# arenas allocated current\s+=\s+([\d,]+)",
    "liveBlockBytes": r"# bytes in allocated blocks\s+=\s+([\d,]+)",
    "freeBlockBytes": r"# bytes in available blocks\s+=\s+([\d,]+)",
    "unusedPoolBytes": r"\d+ unused pools \* \d+ bytes\s+=\s+([\d,]+)",
}


def deep_size(roots: Iterable[Any], seen: set[int]) -> int:
    """Bytes of these objects and what they hold (dicts, lists, tuples, sets, kopf's
    mapping views and index stores), each object once across calls sharing ``seen``."""
    size = 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif type(obj).__name__ == "Index" and hasattr(obj, "_Index__items"):
            stack.extend((obj._Index__items, obj._Index__reverse))
        elif type(obj).__name__ == "Store" and hasattr(obj, "_Store__items"):
            stack.append(obj._Store__items)
        elif hasattr(obj, "_src") and not isinstance(obj, type):  # kopf's Body and views
            stack.append(obj._src)
    return size


def _record_size(record: Any, seen: set[int]) -> int:
    """kopf's record of one object without its memo (a copy of the operator's, shared) and
    without the body, counted apart."""
    size = sys.getsizeof(record)
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if field.name in ("memo", "live_fresh_body"):
            continue
        size += (
            _record_size(value, seen)
            if dataclasses.is_dataclass(value)
            else deep_size([value], seen)
        )
    return size


def holders() -> dict[str, Any]:
    """What holds memory per object, in bytes (kopf internals: best effort)."""
    from kopf._core.engines.indexing import OperatorIndexers
    from kopf._core.reactor.inventory import ResourceMemory

    everything = gc.get_objects()
    records = [o for o in everything if isinstance(o, ResourceMemory)]
    bodies = [
        r.daemons_memory.live_fresh_body
        for r in records
        if r.daemons_memory.live_fresh_body is not None
    ]
    seen: set[int] = set()
    out: dict[str, Any] = {
        "kopfObjectRecords": len(records),
        "kopfBodiesKept": len(bodies),
        "kopfBodiesKeptBytes": deep_size(bodies, seen),
        "kopfRunningDaemons": sum(len(r.daemons_memory.running_daemons) for r in records),
    }
    indexes: dict[str, Any] = {}
    for indexers in (o for o in everything if isinstance(o, OperatorIndexers)):
        for handler_id, indexer in indexers.items():
            indexes[str(handler_id)] = {
                "keys": len(indexer.index),
                "bytesBeyondKopfBodies": deep_size([indexer.index], seen),
            }
    out["indexes"] = indexes
    out["kopfObjectRecordsBytes"] = sum(_record_size(r, seen) for r in records)
    from finetune_operator import metrics

    series = metrics.ftj_phase._metrics
    out["phaseSeries"] = len(series)
    out["phaseSeriesBytes"] = deep_size([series], seen)
    return out


def allocator() -> dict[str, int]:
    """Python's small-object allocator (sys._debugmallocstats writes to the C stderr)."""
    with tempfile.TemporaryFile(mode="w+") as capture:
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read()
    out = {}  # -1: not shown (under tracemalloc)
    for name, pattern in ALLOCATOR_LINES.items():
        found = re.search(pattern, text)
        out[name] = int(found.group(1).replace(",", "")) if found else -1
    return out


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def dump(*_: Any) -> None:
    gc.collect()
    path = os.environ["FINETUNE_BENCH_SNAPSHOT"]
    # RSS, the allocator and the snapshot first: walking the holders leaves allocations of
    # its own behind.
    figures: dict[str, Any] = {"rssKiB": rss_kib(), "allocator": allocator()}
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(path)
    try:
        figures["holders"] = holders()
    except Exception as exc:  # kopf's internals changed: the rest still counts
        figures["holders"] = {"unavailable": repr(exc)}
    Path(path + ".json").write_text(json.dumps(figures, indent=1))
    Path(path + ".done").touch()


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, dump)
    from finetune_operator.cli import main

    sys.exit(main(sys.argv[1:]))
