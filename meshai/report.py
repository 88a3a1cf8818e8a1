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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--report needs matplotlib: pip install 'meshai[plot]'") from None
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
