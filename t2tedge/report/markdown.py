"""The report as Markdown: headline, a table per target, the model facts, provenance."""

from __future__ import annotations

from typing import Any

from t2tedge.evaluation.accuracy import MEASURED
from t2tedge.pipeline.bench import LOCAL
from t2tedge.report.collect import ReportData, Row


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def accuracy_cell(data: ReportData, row: Row) -> str:
    acc = row.accuracy
    if acc.get("status") == "failed":
        return f"**FAILED** ({acc.get('label')}): {acc.get('reason')}"
    if acc.get("top1") is None:
        return f"{acc.get('label', 'unavailable')}: {acc.get('reason', 'not validated')}"
    ref = data.models.get(row.model, {}).get("fp32_torch", {}).get("top1")
    delta = f" ({acc['top1'] - ref:+.2f})" if ref is not None else ""
    overlap = acc.get("calibration_overlap")
    overlap = f" (⚠ calibrated on {overlap} of these images)" if overlap else ""
    where = f" @{acc['host_label']}" if acc.get("host_label") else ""  # validated on another host
    return f"{acc['top1']:.2f}{delta} {acc['label']}{where}{overlap}"


def latency_cells(data: ReportData, row: Row, host: str) -> list[str]:
    """p50, p90, throughput, speed-up vs the float baseline, efficiency — or one labelled reason."""
    record = row.latency.get(host)
    if record is None:
        return ["not run on " + host, "", "", "", ""]
    if record.get("label") != MEASURED:
        return [f"{record.get('label')}: {record.get('reason', '')}", "", "", "", ""]
    base = data.baseline(row)
    base_p50 = base.p50(host) if base is not None else None
    speedup = f"{base_p50 / record['latency_ms_p50']:.2f}x vs {base.precision}" if base_p50 else "-"
    eff = record.get("efficiency_pct")
    eff_cell = f"{eff:.1f}% of {record['peak']['key']}" if eff is not None else "-"
    return [
        f"{record['latency_ms_p50']:.3f} measured",
        f"{record['latency_ms_p90']:.3f}",
        f"{record['throughput_ips']:.0f}",
        speedup,
        eff_cell,
    ]


def target_table(data: ReportData, target: str) -> str:
    header = ["model", "precision", "size", "top-1 % (± vs FP32 torch), label"]
    for host in data.hosts:
        suffix = "" if data.hosts == [LOCAL] else f" @{host}"  # another host's numbers always say whose
        header += [f"p50 ms{suffix}", f"p90 ms{suffix}", f"img/s{suffix}", f"speed-up{suffix}", f"efficiency{suffix}"]
    rows = []
    for row in (r for r in data.rows if r.target == target):
        cells = [row.model, _precision(row), _size(row.size_bytes), accuracy_cell(data, row)]
        for host in data.hosts:
            cells += latency_cells(data, row, host)
        rows.append(cells)
    return table(header, rows)


def target_notes(data: ReportData, target: str) -> list[str]:
    """How a target's emulated numbers were computed, and its FP16 range check, under its table."""
    rows = [r for r in data.rows if r.target == target]
    notes = []
    arithmetic = dict.fromkeys(r.accuracy["note"] for r in rows if r.accuracy.get("note"))
    if arithmetic:
        notes.append("Emulated accuracy, arithmetic used:\n" + "\n".join(f"- {a}" for a in arithmetic))
    checked = [r for r in rows if r.fp16_range]
    if checked:
        lines = []
        for r in checked:
            check = r.fp16_range
            outside = check.get("outside_fp16", [])
            where = f" ({check.get('widest_tensor')})" if check.get("widest_tensor") else ""
            line = (
                f"- {r.model} {r.precision}: largest |value| {check.get('max_abs', 0):.4g}{where} on "
                f"{check.get('images')} calibration images; {len(outside)} tensors beyond FP16's 65504"
            )
            if outside:
                names = ", ".join(f"`{o['tensor']}` ({o['max_abs']:.3g})" for o in outside[:3])
                line += f": {names}{' …' if len(outside) > 3 else ''}"
            if r.fp32_layers:
                line += f"; {len(r.fp32_layers)} layers pinned to FP32"
            lines.append(line)
        notes.append("FP16 range check (every float tensor, computed in FP32):\n" + "\n".join(lines))
    return notes


def _precision(row: Row) -> str:
    used = row.runtime.get("inference_precision_used")
    return f"{row.precision} (runs {used})" if used and used not in row.precision else row.precision


def headline_rows(data: ReportData) -> list[dict[str, Any]]:
    """T2T-ViT vs each MobileNet on each target and precision both were built in."""
    out = []
    t2t = [r for r in data.rows if r.family == "t2t_vit"]
    for row in t2t:
        for other in data.rows:
            if other.family != "mobilenet" or (other.target, other.precision) != (row.target, row.precision):
                continue
            host = next((h for h in data.hosts if row.p50(h) is not None and other.p50(h) is not None), None)
            entry: dict[str, Any] = {
                "target": row.target,
                "precision": row.precision,
                "t2t_vit": row.model,
                "mobilenet": other.model,
                "host": host,
                "t2t_top1": row.top1,
                "mobilenet_top1": other.top1,
                "accuracy_label": f"{row.accuracy.get('label')}/{other.accuracy.get('label')}",
            }
            if row.top1 is not None and other.top1 is not None:
                entry["top1_delta"] = round(row.top1 - other.top1, 2)
            if host is not None:
                entry["t2t_p50_ms"] = row.p50(host)
                entry["mobilenet_p50_ms"] = other.p50(host)
                entry["latency_ratio"] = round(row.p50(host) / other.p50(host), 2)
            else:
                reason = row.latency.get(data.hosts[0], {}).get("reason") or "not measured"
                entry["latency_unavailable"] = reason
            out.append(entry)
    return out


def headline_table(entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        if "latency_ratio" in e:
            latency = f"{e['t2t_p50_ms']:.3f} / {e['mobilenet_p50_ms']:.3f} ms"
            ratio = f"{e['latency_ratio']:.2f}x measured ({e['host']})"
        else:
            latency, ratio = "-", f"unavailable: {e['latency_unavailable']}"
        delta = f"{e['top1_delta']:+.2f} ({e['accuracy_label']})" if "top1_delta" in e else "unavailable"
        rows.append([e["target"], e["precision"], f"{e['t2t_vit']} vs {e['mobilenet']}", latency, ratio, delta])
    header = ["target", "precision", "T2T-ViT vs MobileNet", "p50 T2T / MobileNet", "latency ratio", "top-1 Δ (pts)"]
    return table(header, rows)


def models_table(data: ReportData) -> str:
    rows = []
    for name, facts in data.models.items():
        counted, paper, ref = facts.get("counted", {}), facts.get("paper", {}), facts.get("fp32_torch", {})

        def fmt(value: Any) -> str:
            return "-" if value is None else f"{value:g}"

        rows.append([
            name,
            fmt(counted.get("params_m")),
            fmt(paper.get("params_m")),
            fmt(counted.get("macs_g")),
            fmt(paper.get("macs_g")),
            fmt(paper.get("top1")),
            f"{facts.get('weights')}, {facts.get('image_size')} px, {facts.get('num_classes')} classes",
            f"{ref['top1']:.2f} measured" if "top1" in ref else "-",
        ])  # fmt: skip
    header = ["model", "params M (counted)", "params M (paper)", "GMACs (counted)", "GMACs (paper)",
              "ImageNet top-1 (paper)", "built here", "FP32 torch top-1 here"]  # fmt: skip
    return table(header, rows)


def provenance(data: ReportData) -> str:
    lines = []
    for s in data.summaries:
        recipe = s.get("recipe", {})
        host = s.get("host", {})
        lines += [
            f"- recipe `{recipe.get('name')}` ({s['path']}), finished {s.get('finished')}",
            f"  - validation: `{recipe.get('data', {}).get('validation')}`; calibration: "
            f"`{recipe.get('data', {}).get('calibration')}`, N={recipe.get('calibration', {}).get('size')}, "
            f"seed {recipe.get('calibration', {}).get('seed')}; calibration/validation overlap: "
            f"{s.get('calibration_validation_overlap')}",
            f"  - latency settings: {recipe.get('benchmark')}",
            f"  - host: {host.get('processor')}, {host.get('cores')} cores, ISA {', '.join(host.get('isa', []))}, "
            f"{host.get('platform')}, Python {host.get('python')}; fingerprint "
            f"{s.get('host_fingerprint', 'unrecorded')} (its numbers elsewhere show as host-<fingerprint>)",
            f"  - versions: {', '.join(f'{k} {v}' for k, v in host.get('versions', {}).items())}; "
            f"t2tedge {s.get('t2tedge')}",
        ]
    records = [r for row in data.rows for r in row.latency.values() if "peak" in r]
    peaks = {r["peak"]["key"]: r["peak"]["gmacs_per_s"] for r in records}
    if peaks:
        lines.append(
            "- host peak GEMM (1024³ MatMul, same runtime and threads): "
            + ", ".join(f"{k} {v:g} GMAC/s" for k, v in sorted(peaks.items()))
        )
    return "\n".join(lines)


def tuning_section(fronts: list[dict[str, Any]], plots: dict[str, str]) -> list[str]:
    """``t2tedge tune``'s fronts: every point, the front and the chosen one, with the plot."""
    if not fronts:
        return []
    parts = [
        "## INT8 placement tuning",
        "From `t2tedge tune`: each point is an INT8 build, scored against FP32 PyTorch on held-out images of the "
        "calibration source (never the validation set) and timed on the target runtime (measured, batch 1). "
        "**front**: no other point is both faster and more faithful; **chosen**: the fastest point that keeps "
        "the rule, written to the tuned placements `build --tuned` applies.",
    ]
    for front in fronts:
        rule = ", ".join(f"{k} {v}" for k, v in front["rule"].items())
        chosen = (front.get("chosen") or {}).get("name")
        fp32 = front["fp32"]["latency_ms_p50"]
        rows = []
        for p in sorted(front["points"], key=lambda p: (p["latency_ms_p50"] is None, p["latency_ms_p50"] or 0)):
            measured = p["latency_ms_p50"] is not None and p["heldout_top1_agreement"] is not None
            rows.append(
                [
                    f"**{p['name']}**" if p["name"] == chosen else p["name"],
                    f"{p['heldout_top1_agreement']:.1f}" if measured else "-",
                    f"{p['latency_ms_p50']:.2f}" if measured else p.get("error", "-"),
                    f"{p['speedup_vs_fp32']:.2f}x" if measured and p.get("speedup_vs_fp32") else "-",  # own round
                    ("front" if p["on_front"] else "") + (" · chosen" if p["name"] == chosen else ""),
                ]
            )
        host = front["host"].get("processor", "?")
        parts += [
            f"### {front['model']} on {front['target']} ({front['image_size']} px, {host})",
            f"Rule: {rule}; {front['heldout_images']} held-out images; FP32 on this runtime "
            f"{', '.join(f'{ms:.2f}' for ms in fp32)} ms p50 (one per timing round; each point's speed-up is "
            "against the FP32 of its own round)."
            if fp32
            else f"Rule: {rule}; {front['heldout_images']} held-out images.",
            table(["point", "agreement %", "ms p50", "vs fp32", ""], rows),
        ]
        key = f"{front['model']}-{front['target']}"
        if key in plots:
            parts.append(f"![tuning {key}]({plots[key]})")
    return parts


def render(
    data: ReportData,
    headline: list[dict[str, Any]],
    plots: dict[str, str],
    generated: str,
    tuning: list[str] | None = None,
) -> str:
    parts = [
        "# t2tedge report: T2T-ViT vs MobileNet",
        f"Build directory `{data.build_dir}`; generated {generated}. Every number carries its label: "
        "**measured** (the target's runtime ran it on the named host), **emulated** (a stand-in ran the same "
        "graph or math; accuracy only) or **unavailable** (with the reason). Latency is batch "
        f"{data.point['batch']}, threads {data.point['threads'] or 'all'}; top-1 Δ is against the model's FP32 "
        "PyTorch top-1 on the same images.",
        "## Headline: T2T-ViT vs MobileNet per target",
        "Latency ratio = T2T-ViT p50 / MobileNet p50 (above 1: T2T-ViT is slower); top-1 Δ = T2T-ViT − MobileNet.",
        headline_table(headline) if headline else "_No T2T-ViT/MobileNet pair in this build._",
    ]
    for name, file in plots.items():
        parts.append(f"![{name}]({file})")
    if not plots:
        parts.append("_No measured latency on any host, so no plots._")
    for target in dict.fromkeys(r.target for r in data.rows):
        parts += [f"## {target}", target_table(data, target), *target_notes(data, target)]
    parts += tuning or []
    parts += ["## Models: counted vs the paper", models_table(data), "## Provenance", provenance(data)]
    return "\n\n".join(parts) + "\n"
