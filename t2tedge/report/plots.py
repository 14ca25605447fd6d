"""The report's PNGs: accuracy vs latency per target (Pareto front marked) and latency by target/precision."""

from __future__ import annotations

from pathlib import Path

from t2tedge.report.collect import ReportData, Row

MARKERS = {"t2t_vit": "o", "mobilenet": "^"}


def _colors(models: list[str]) -> dict[str, tuple]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {model: palette(i % 10) for i, model in enumerate(models)}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    front: list[tuple[float, float]] = []
    for latency, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((latency, accuracy))
    return front


def measured(data: ReportData, host: str) -> list[Row]:
    return [r for r in data.rows if r.p50(host) is not None and r.top1 is not None]


def accuracy_vs_latency(data: ReportData, host: str, path: Path) -> Path | None:
    """One panel per target with measured latency on ``host``; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = measured(data, host)
    targets = [t for t in dict.fromkeys(r.target for r in rows)]
    if not targets:
        return None
    colors = _colors(list(dict.fromkeys(r.model for r in data.rows)))
    fig, axes = plt.subplots(1, len(targets), figsize=(6.2 * len(targets), 5.0), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        mine = [r for r in rows if r.target == target]
        for row in mine:
            ax.scatter(row.p50(host), row.top1, s=70, color=colors[row.model], marker=MARKERS.get(row.family, "s"),
                       edgecolor="black", linewidth=0.6, zorder=3)  # fmt: skip
        # precision labels: alternate above/below so neighbours do not collide
        for i, row in enumerate(sorted(mine, key=lambda r: (r.p50(host), r.top1))):
            ax.annotate(row.precision, (row.p50(host), row.top1), textcoords="offset points", fontsize=8,
                        xytext=(6, 7 if i % 2 == 0 else -12))  # fmt: skip
        front = pareto_front([(r.p50(host), r.top1) for r in mine])
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", linewidth=1.2, zorder=2,
                label="Pareto front")  # fmt: skip
        ax.set_xscale("log")
        # plain numbers at 1-2-5 steps instead of 2x10^0 style labels on every minor tick
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"{target} ({host})", fontsize=11)
        ax.set_xlabel("p50 latency, batch 1 (ms, log scale)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, which="both", alpha=0.3)
        low, high = min(r.top1 for r in mine), max(r.top1 for r in mine)
        ax.set_ylim(low - max(1.0, 0.15 * (high - low)), high + max(1.0, 0.15 * (high - low)))
        ax.margins(x=0.25)
    handles = [
        plt.Line2D([], [], marker=MARKERS.get(data.models.get(m, {}).get("family", ""), "s"), linestyle="",
                   markersize=8, markerfacecolor=colors[m], markeredgecolor="black", label=m)
        for m in dict.fromkeys(r.model for r in rows)
    ]  # fmt: skip
    handles.append(plt.Line2D([], [], linestyle="--", color="gray", label="Pareto front"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle("Accuracy vs latency (o T2T-ViT, ^ MobileNet; measured latency)", fontsize=12)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def latency_bars(data: ReportData, host: str, path: Path) -> Path | None:
    """Grouped bars: one group per target/precision, one bar per model, p50 labelled on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = measured(data, host)
    if not rows:
        return None
    groups = list(dict.fromkeys(f"{r.target}\n{r.precision}" for r in rows))
    models = list(dict.fromkeys(r.model for r in rows))
    colors = _colors(list(dict.fromkeys(r.model for r in data.rows)))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.5 * len(groups) * max(1, len(models) / 2)), 4.8))
    for j, model in enumerate(models):
        xs, ys = [], []
        for i, group in enumerate(groups):
            row = next((r for r in rows if r.model == model and f"{r.target}\n{r.precision}" == group), None)
            if row is not None:
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(row.p50(host))
        bars = ax.bar(xs, ys, width, label=model, color=colors[model], edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=2, rotation=90)
    ax.set_xticks(range(len(groups)), groups, fontsize=9)
    ax.set_ylabel("p50 latency, batch 1 (ms)")
    ax.set_ylim(0, max(r.p50(host) for r in rows) * 1.25)
    ax.set_title(f"Latency by target and precision ({host}; measured only)", fontsize=12)
    ax.legend(fontsize=9, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
