"""The report's figures as PNG bytes. matplotlib Figure objects directly, so no global pyplot
backend state is touched."""

import io

import numpy as np
from matplotlib.figure import Figure

from kava.report.load import seeded
from kava.report.summary import model_name

# What a table cell or panel shows for a value the run does not have.
NA = "n/a"


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _curve_panels(metrics):
    """{panel title: [(arm, seed, series name, steps, values)]} for CE, KV loss and cosine."""
    panels = {"CE loss": [], "KV loss": [], "KV cosine (train)": []}
    for arm, runs in metrics.items():
        for seed, steps in seeded(runs).items():
            keys = sorted({k for step in steps for k in step})
            series = [("CE loss", "ce", "ce")]
            for panel, prefix in (("KV loss", "kv/"), ("KV cosine (train)", "cos/")):
                # `cos/<teacher>` only: training also logs `cos/<teacher>/<layer>`, which would
                # bury the per-teacher curves under one line per layer.
                series += [(panel, k, k.removeprefix(prefix)) for k in keys
                           if k.startswith(prefix) and "/" not in k.removeprefix(prefix)]
            for panel, key, name in series:
                points = [(s["step"], s[key]) for s in steps if s.get(key) is not None]
                if points:
                    panels[panel].append((arm, seed, name, *zip(*points)))
    return panels


def plot_training_curves(metrics):
    """PNG of CE / KV loss / train cosine against step, one line per arm × seed
    (× teacher), colour by arm; an empty panel says "n/a" (the ce arm logs no KV loss)."""
    panels = _curve_panels(metrics)
    colours = {arm: f"C{k}" for k, arm in enumerate(metrics)}
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(13, 3.6))
    for ax, (title, lines) in zip(fig.subplots(1, 3), panels.items()):
        ax.set_title(title)
        ax.set_xlabel("step")
        if not lines:
            ax.text(0.5, 0.5, f"{NA}: no arm logged this", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        names = sorted({name for *_, name, _, _ in lines})
        for arm, seed, name, steps, values in lines:
            label = f"{arm}/seed{seed}" + (f" {name}" if len(names) > 1 else "")
            ax.plot(steps, values, color=colours[arm], linewidth=1, alpha=0.8, label=label,
                    linestyle=styles[names.index(name) % len(styles)])
        ax.legend(fontsize=7)
    return _png(fig)


def plot_cosine_heatmap(evals):
    """PNG of held-out KV cosine, student layer × teacher, one panel per arm (mean over
    seeds); None when no arm has per-layer cosines."""
    maps = {}
    for arm, runs in evals["arms"].items():
        recs = [rec for rec in runs.values() if rec["kv_cosine"] is not None]
        if recs:
            teachers = list(recs[0]["kv_cosine"]["per_layer"])  # the config's teacher order
            maps[arm] = (teachers, np.mean([[r["kv_cosine"]["per_layer"][t] for t in teachers]
                                            for r in recs], axis=0).T)
    if not maps:
        return None
    fig = Figure(figsize=(3.2 + 2.4 * len(maps), 4))
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    for ax, (arm, (teachers, grid)) in zip(axes, maps.items()):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=min(0.0, grid.min()), vmax=1.0)
        ax.set_title(f"{arm}: held-out cosine")
        ax.set_xticks(range(len(teachers)), teachers, rotation=30, ha="right")
        ax.set_yticks(range(grid.shape[0]))
        ax.set_ylabel("student layer")
        for (layer, col), value in np.ndenumerate(grid):
            ax.text(col, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 else "white")  # readable on viridis' light end
        fig.colorbar(image, ax=ax)
    return _png(fig)


def plot_bars(summary):
    """PNG of accuracy and NLL per model, error bars = bootstrap 95 % CI over examples."""
    labels = list(summary["models"])
    names = [model_name(label, summary) for label in labels]
    fig = Figure(figsize=(11, 3.6))
    for ax, metric, scale, ylabel in zip(fig.subplots(1, 2), ("accuracy", "nll"), (100, 1),
                                         ("accuracy (%)", "answer NLL (nats/token)")):
        means = np.array([summary["models"][m][metric]["mean"] for m in labels]) * scale
        cis = np.array([summary["models"][m][metric]["ci"] for m in labels]) * scale
        ax.bar(names, means, yerr=[means - cis[:, 0], cis[:, 1] - means], capsize=4,
               color=[f"C{k}" for k in range(len(labels))])
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=30)
    return _png(fig)
