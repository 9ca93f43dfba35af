"""PNG plots of ``resnext-bench layers`` rows (matplotlib, no display needed)."""

from pathlib import Path


def _grouped_bars(ax, rows, key, providers, layers):
    width = 0.8 / max(len(providers), 1)
    for i, provider in enumerate(providers):
        values = []
        for layer in layers:
            match = [r[key] for r in rows if r["layer"] == layer and r["provider"] == provider]
            values.append(match[0] if match and match[0] is not None else 0.0)
        ax.bar([j + i * width for j in range(len(layers))], values, width, label=provider)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=30)
    ax.legend(fontsize="small")


def plot_layers(rows: list[dict], prefix: str, title: str) -> list[Path]:
    """Writes ``PREFIX-speedup.png`` (speedup over PyTorch per layer, one panel per
    mode) and ``PREFIX-roofline.png`` (% of the memory floor per layer). Untimed
    providers are left out. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["median_ms"] is not None]
    modes = list(dict.fromkeys(r["mode"] for r in timed))
    layers = list(dict.fromkeys(r["layer"] for r in timed))
    paths = []
    for key, suffix, ylabel, skip in (("speedup", "speedup", "speedup over PyTorch (×)", "pytorch"),
                                      ("pct_floor", "roofline", "% of the memory floor", None)):
        fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(6 * max(len(modes), 1), 4.5),
                                 squeeze=False)
        for ax, mode in zip(axes[0], modes):
            mode_rows = [r for r in timed if r["mode"] == mode]
            providers = [p for p in dict.fromkeys(r["provider"] for r in mode_rows) if p != skip]
            _grouped_bars(ax, mode_rows, key, providers, layers)
            if key == "speedup":
                ax.axhline(1.0, color="grey", linewidth=0.8)
            else:
                ax.axhline(100.0, color="grey", linewidth=0.8)
            ax.set_title(mode)
            ax.set_ylabel(ylabel)
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(f"{prefix}-{suffix}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
