"""loadtest.png: served throughput and p99 latency against concurrency, modulated beside bare."""

from __future__ import annotations

from pathlib import Path

from aim.files import save_figure

STYLES = {
    "bare": ("C0", "bare model"),
    "utility0": ("C2", "modulated, utility 0"),
    "mixed": ("C3", "modulated, mixed tiers"),
    "tiered": ("C1", "tiered (tier from the key), mixed"),
}
LINES = {"grpc": "-", "http": "--"}


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for workload, (colour, label) in STYLES.items():
        for protocol, line in LINES.items():
            chosen = sorted(
                (p for p in results["points"] if p["workload"] == workload and p["protocol"] == protocol),
                key=lambda p: p["concurrency"],
            )
            if not chosen:
                continue
            x = [p["concurrency"] for p in chosen]
            axes[0].plot(
                x,
                [p["throughput"] for p in chosen],
                line,
                marker="o",
                ms=4,
                color=colour,
                label=f"{label} ({protocol})",
            )
            axes[1].plot(
                x, [p["p99_ms"] for p in chosen], line, marker="o", ms=4, color=colour, label=f"{label} ({protocol})"
            )
    server = results["server"]
    threads = server["threads_per_instance"]
    setup = f"{server['instances']} instances x {threads} ONNX Runtime thread(s), {results['machine']['cores']} cores"
    for ax, ylabel, title in ((axes[0], "requests / s", "throughput"), (axes[1], "p99 latency (ms)", "p99 latency")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p["concurrency"] for p in results["points"]}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{results['model']} on Triton: {title} ({setup})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
