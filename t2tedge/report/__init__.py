"""`t2tedge report BUILD_DIR`: one Markdown file, its JSON and PNG plots, from a build's summaries and manifests."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from t2tedge.pipeline.bench import LOCAL
from t2tedge.pipeline.store import write_json
from t2tedge.report.collect import ReportData, collect
from t2tedge.report.markdown import headline_rows, render, tuning_section
from t2tedge.report.plots import accuracy_vs_latency, latency_bars

REPORT_DIR = "report"


@dataclasses.dataclass
class ReportFiles:
    markdown: Path
    json: Path
    plots: list[Path]
    headline: list[dict]
    data: ReportData


def write_report(build_dir: str | Path, out_dir: str | Path | None = None) -> ReportFiles:
    """Write report.md, report.json and the PNGs into ``out_dir`` (default: BUILD_DIR/report)."""
    data = collect(build_dir)
    out = Path(out_dir) if out_dir else Path(build_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    plots: dict[str, str] = {}
    written: list[Path] = []
    for host in data.hosts:
        suffix = "" if host == LOCAL else f"-{host}"
        for name, make in (("accuracy vs latency", accuracy_vs_latency), ("latency by target", latency_bars)):
            file = f"{name.replace(' ', '_')}{suffix}.png"
            if make(data, host, out / file) is not None:
                plots[f"{name} ({host})"] = file
                written.append(out / file)
    headline = headline_rows(data)
    fronts, tuning_plots = _tuning(Path(build_dir), out)
    written += [out / f for f in tuning_plots.values()]
    markdown = out / "report.md"
    markdown.write_text(render(data, headline, plots, generated, tuning_section(fronts, tuning_plots)))
    json_path = out / "report.json"
    write_json(
        json_path,
        {
            "generated": generated,
            "build_dir": str(data.build_dir),
            "point": data.point,
            "hosts": data.hosts,
            "headline": headline,
            "models": data.models,
            "rows": [dataclasses.asdict(row) for row in data.rows],
            "plots": plots,
            "summaries": [s["path"] for s in data.summaries],
            "tuning": [{k: f[k] for k in ("model", "target", "front", "chosen", "rule")} for f in fronts],
        },
    )
    return ReportFiles(markdown, json_path, written, headline, data)


def _tuning(build_dir: Path, out: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The fronts ``t2tedge tune`` wrote under BUILD_DIR/tune, and their plots copied beside the report."""
    import shutil

    fronts, plots = [], {}
    for path in sorted((build_dir / "tune").glob("*.json")):
        front = json.loads(path.read_text())
        if not isinstance(front, dict) or "points" not in front:
            continue
        fronts.append(front)
        png = path.with_suffix(".png")
        if png.is_file():
            name = f"tuning_{png.name}"
            shutil.copyfile(png, out / name)
            plots[f"{front['model']}-{front['target']}"] = name
    return fronts, plots
