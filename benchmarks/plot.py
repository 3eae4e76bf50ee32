"""Throughput vs concurrency as a PNG, so a run's series can be compared at a glance.

matplotlib is optional (pip install -e '.[bench]'): without it plot_throughput says so and
returns None, and the benchmark run goes on.
"""

from __future__ import annotations


def plot_throughput(results: dict, out_png: str,
                    title: str = "infer-small throughput") -> str | None:
    """Draw ``{series: {concurrency: infer/s}}`` on a log2 concurrency axis; returns out_png.

    Any series may be missing or partial (a row not run); empty series are skipped. Keys may
    be ints or, as read back from a results JSON, strings.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on CI or the benchmark machine
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ticks = set()
    for name, points in results.items():
        pts = sorted((int(c), v) for c, v in points.items() if v is not None)  # JSON keys are str
        if pts:
            xs = [c for c, _ in pts]
            ax.plot(xs, [v for _, v in pts], marker="o", label=name)
            ticks.update(xs)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks) or [1, 4, 16, 64])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("throughput (infer/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
