"""Pictures of a run for people: per-stage latency distributions and a timeline of pipelined requests.

Pure in, file out: it takes the stage events nodes recorded (``events`` control: one dict per stage
run with ``stage``, ``node``, ``request``, ``start``, ``compute_end``, ``end`` in wall-clock seconds)
and the entry's end-to-end latencies, and writes one PNG.  matplotlib is the ``[plot]`` extra.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshai.errors import ConfigError


def write_run_report(
    path: str | os.PathLike[str],
    events: Sequence[Mapping[str, Any]],
    latencies_s: Sequence[float],
    *,
    title: str = "",
    timeline_requests: int = 8,
) -> Path:
    """Write the run's PNG: top left, end-to-end latency; top right, per-stage compute and transfer
    time; bottom, a timeline of ``timeline_requests`` consecutive requests across the stages."""
    plt = pyplot("--report")
    if not events:
        raise ConfigError("no stage events to plot (did any request complete?)")
    stages = sorted({int(e["stage"]) for e in events})
    node_of = {int(e["stage"]): str(e["node"]) for e in events}
    fig = plt.figure(figsize=(12, 8), dpi=110)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.1])
    ax_e2e = fig.add_subplot(grid[0, 0])
    ax_stage = fig.add_subplot(grid[0, 1])
    ax_time = fig.add_subplot(grid[1, :])

    ms = [x * 1e3 for x in latencies_s]
    if ms:
        ax_e2e.hist(ms, bins=min(40, max(5, len(ms) // 5)), color="#4C72B0")
        for q, style in ((50, "-"), (95, "--")):
            v = sorted(ms)[min(len(ms) - 1, int(len(ms) * q / 100))]
            ax_e2e.axvline(v, color="black", linestyle=style, linewidth=1, label=f"p{q} {v:.1f} ms")
        ax_e2e.legend(loc="upper right", fontsize=8)
    ax_e2e.set_title("end-to-end latency at the entry")
    ax_e2e.set_xlabel("ms")
    ax_e2e.set_ylabel("requests")

    compute = [
        [(e["compute_end"] - e["start"]) * 1e3 for e in events if int(e["stage"]) == s] for s in stages
    ]
    transfer = [[(e["end"] - e["compute_end"]) * 1e3 for e in events if int(e["stage"]) == s] for s in stages]
    pos = list(range(len(stages)))
    b1 = ax_stage.boxplot(
        compute, positions=[p - 0.18 for p in pos], widths=0.3, patch_artist=True, showfliers=False
    )
    b2 = ax_stage.boxplot(
        transfer, positions=[p + 0.18 for p in pos], widths=0.3, patch_artist=True, showfliers=False
    )
    for patch in b1["boxes"]:
        patch.set_facecolor("#55A868")
    for patch in b2["boxes"]:
        patch.set_facecolor("#C44E52")
    ax_stage.set_xticks(pos, [f"stage {s}\n{node_of[s]}" for s in stages])
    ax_stage.set_ylabel("ms")
    ax_stage.set_title("per stage: compute (green) and send (red)")

    by_request: dict[int, list[Mapping[str, Any]]] = {}
    for e in events:
        by_request.setdefault(int(e["request"]), []).append(e)
    complete = [r for r, es in sorted(by_request.items()) if {int(x["stage"]) for x in es} == set(stages)]
    pick = (
        complete[len(complete) // 2 : len(complete) // 2 + timeline_requests] or complete[:timeline_requests]
    )
    if pick:
        t0 = min(e["start"] for r in pick for e in by_request[r])
        cmap = plt.get_cmap("tab10")
        for i, r in enumerate(pick):
            for e in by_request[r]:
                y = stages.index(int(e["stage"]))
                ax_time.barh(
                    y,
                    (e["compute_end"] - e["start"]) * 1e3,
                    left=(e["start"] - t0) * 1e3,
                    height=0.6,
                    color=cmap(i % 10),
                    edgecolor="black",
                    linewidth=0.4,
                )
                ax_time.barh(
                    y,
                    (e["end"] - e["compute_end"]) * 1e3,
                    left=(e["compute_end"] - t0) * 1e3,
                    height=0.25,
                    color=cmap(i % 10),
                    alpha=0.5,
                )
                ax_time.text((e["start"] - t0) * 1e3, y, str(r), fontsize=7, va="center")
    ax_time.set_yticks(range(len(stages)), [f"stage {s} · {node_of[s]}" for s in stages])
    ax_time.invert_yaxis()
    ax_time.set_xlabel("ms since the first request shown")
    ax_time.set_title(f"timeline of {len(pick)} pipelined requests (one colour each; thin bar: sending)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def pyplot(what: str) -> Any:
    """matplotlib.pyplot on the Agg backend; ConfigError naming ``what`` needs it when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(f"{what} needs matplotlib: pip install 'meshai[plot]'") from None
    return plt


def write_ab_png(report: Mapping[str, Any], path: str | Path) -> Path:
    """An A/B report's PNG: left, the two latency distributions (empirical CDFs, medians marked) with the
    Mann–Whitney verdict; right, error rate and accuracy per variant with 95 % intervals."""
    plt = pyplot("an A/B report's plot")
    variants = report["variants"]
    tests = report.get("tests", {})
    fig, (ax_lat, ax_rate) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    colours = {"A": "#4C72B0", "B": "#DD8452"}
    for label in ("A", "B"):
        v = variants[label]
        ms = sorted(float(x) for x in v["latencies_ms"])
        if ms:
            y = [(i + 1) / len(ms) for i in range(len(ms))]
            ax_lat.step(
                ms, y, where="post", color=colours[label], label=f"{label} (v{v['version']}, n={len(ms)})"
            )
            ax_lat.axvline(ms[len(ms) // 2], color=colours[label], linestyle=":", linewidth=1)
    lat = tests.get("latency")
    ax_lat.set_title(
        "latency" + (f": {lat['reason']}" if lat else ": too few samples"), fontsize=8, wrap=True
    )
    ax_lat.set_xlabel("end-to-end latency (ms)")
    ax_lat.set_ylabel("share of requests at or below")
    ax_lat.legend(loc="lower right", fontsize=8)
    names: list[str] = []
    positions: list[float] = []
    for group, (metric, hits, n_key) in enumerate(
        (("error rate", "errors", "requests"), ("accuracy", "correct", "labelled"))
    ):
        for k, label in enumerate(("A", "B")):
            v = variants[label]
            n = int(v[n_key])
            rate = v[hits] / n if n else 0.0
            half = 1.96 * (rate * (1 - rate) / n) ** 0.5 if n else 0.0
            x = group * 2.5 + k
            ax_rate.bar(x, rate * 100, color=colours[label], yerr=half * 100, capsize=4)
            names.append(f"{metric}\n{label} (n={n})")
            positions.append(x)
    ax_rate.set_xticks(positions, names, fontsize=8)
    verdicts = [
        f"{k}: p={t['p_value']:.3g}{' (significant)' if t['significant'] else ''}"
        for k, t in tests.items()
        if k != "latency"
    ]
    ax_rate.set_title("; ".join(verdicts) or "rates: too few samples", fontsize=8)
    ax_rate.set_ylabel("%")
    split = report["split"]
    fig.suptitle(
        f"A/B test of {report['deployment']}: B gets {split['share_b'] * 100:.0f} % by {split['by']}"
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
