"""The human-readable run report: ``report.md`` and ``loss_curve.svg`` (plain SVG, no plotting library)."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

SVG_W, SVG_H, PAD = 640, 320, 48


def loss_points(
    log_history: list[dict[str, Any]],
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) and (step, eval_loss) pairs from the trainer's log history."""
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    evals = [
        (int(e["step"]), float(e["eval_loss"]))
        for e in log_history
        if "eval_loss" in e and "step" in e
    ]
    return train, evals


Scale = Callable[[float], float]


def _polyline(points: list[tuple[int, float]], sx: Scale, sy: Scale, color: str) -> str:
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in points
    )
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>{dots}'


def loss_curve_svg(
    train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str
) -> str:
    """A self-contained SVG line chart of training (and eval) loss against step."""
    pts = train + evals
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" viewBox="0 0 {SVG_W} {SVG_H}">'
    bg = f'<rect width="{SVG_W}" height="{SVG_H}" fill="white"/>'
    label = f'<text x="{PAD}" y="24" font-family="sans-serif" font-size="14">{html.escape(title)}</text>'
    if not pts:
        msg = f'<text x="{PAD}" y="{SVG_H // 2}" font-family="sans-serif" font-size="12">no loss logged</text>'
        return head + bg + label + msg + "</svg>\n"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (SVG_W - 2 * PAD)

    def sy(y: float) -> float:
        return SVG_H - PAD - (y - y0) / (y1 - y0) * (SVG_H - 2 * PAD)

    axes = (
        f'<line x1="{PAD}" y1="{SVG_H - PAD}" x2="{SVG_W - PAD}" y2="{SVG_H - PAD}" stroke="black"/>'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{SVG_H - PAD}" stroke="black"/>'
    )
    ticks = "".join(
        f'<text x="{tx}" y="{ty}" font-family="sans-serif" font-size="11" text-anchor="{anchor}">{text}</text>'
        for tx, ty, anchor, text in (
            (PAD, SVG_H - PAD + 16, "start", f"step {x0}"),
            (SVG_W - PAD, SVG_H - PAD + 16, "end", f"step {x1}"),
            (PAD - 4, SVG_H - PAD, "end", f"{y0:.3g}"),
            (PAD - 4, PAD + 4, "end", f"{y1:.3g}"),
        )
    )
    legend = (
        f'<text x="{SVG_W - PAD}" y="24" font-family="sans-serif" font-size="11" text-anchor="end">'
        '<tspan fill="#1f77b4">train loss</tspan>'
        + (' <tspan fill="#d62728">eval loss</tspan>' if evals else "")
        + "</text>"
    )
    lines = _polyline(train, sx, sy, "#1f77b4") if train else ""
    if evals:
        lines += _polyline(evals, sx, sy, "#d62728")
    return head + bg + label + axes + ticks + legend + lines + "</svg>\n"


def _table(rows: Mapping[str, object]) -> list[str]:
    out = ["| name | value |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in rows.items()]
    return out


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) or "-"
    return "-" if v is None else str(v)


def report_markdown(
    job_name: str,
    data: Mapping[str, object],
    train_summary: Mapping[str, object],
    metrics: Mapping[str, float],
    adapter: Mapping[str, object],
    notes: list[str],
) -> str:
    lines = [f"# Fine-tuning report: {job_name}", ""]
    lines += ["## Data", "", *_table(data), ""]
    lines += ["## Training", "", *_table(train_summary), "", "![loss curve](loss_curve.svg)", ""]
    lines += ["## Evaluation", ""]
    lines += [*_table(metrics), ""] if metrics else ["No evaluation metrics were computed.", ""]
    lines += ["## Adapter", "", *_table(adapter), ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def write_report(
    output_dir: str | Path,
    job_name: str,
    log_history: list[dict[str, Any]],
    data: Mapping[str, object],
    train_summary: Mapping[str, object],
    metrics: Mapping[str, float],
    adapter: Mapping[str, object],
    notes: list[str],
) -> None:
    out = Path(output_dir)
    train, evals = loss_points(log_history)
    (out / "loss_curve.svg").write_text(
        loss_curve_svg(train, evals, f"{job_name}: loss"), encoding="utf-8"
    )
    (out / "report.md").write_text(
        report_markdown(job_name, data, train_summary, metrics, adapter, notes), encoding="utf-8"
    )
