"""PNG plots of a run's metrics: loss (train and validation), learning rate, throughput, and
for reinforcement learning the reward (train mean +- std, held-out greedy reward/accuracy),
for an MoE run the load of each expert per layer.

Uses matplotlib's object API on the Agg canvas: no pyplot state, no display needed.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _series(records, key):
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_metrics(records: list[dict], out_dir: Path, title: str = "") -> list[Path]:
    """loss.png, lr.png, throughput.png from metrics.jsonl-style records (step and eval)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    written = []

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    x, y = _series(steps, "loss")
    ax.plot(x, y, lw=1, label="train loss")
    if evals:
        x, y = _series(evals, "val_loss")
        ax.plot(x, y, "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{title} loss".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out_dir / "loss.png"))

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    ax.plot(*_series(steps, "lr"), lw=1.2, color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title=f"{title} learning rate".strip())
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "lr.png"))

    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot()
    ax.plot(*_series(steps, "tokens_per_s"), lw=1, color="tab:orange", label="tokens/s (global)")
    ax.set(xlabel="step", ylabel="tokens/s", title=f"{title} throughput".strip())
    ax.grid(alpha=0.3)
    x, y = _series(steps, "mfu")
    if y:
        twin = ax.twinx()
        twin.plot(x, [100 * v for v in y], lw=0.8, color="tab:purple", alpha=0.6, label="MFU %")
        twin.set_ylabel("MFU (%)")
    written.append(_save(fig, out_dir / "throughput.png"))
    if any("reward" in r for r in steps):
        written.append(plot_reward(steps, [r for r in records if "val_reward" in r], out_dir,
                                   title))
    if any("moe/layer0/load" in r for r in steps):
        written.append(plot_expert_load(steps, out_dir / "expert_load.png", title))
    return written


def plot_reward(steps: list[dict], evals: list[dict], out_dir: Path, title: str = "") -> Path:
    """reward.png: the sampled completions' mean reward per step (+- its std) and, at each
    evaluation, the greedy held-out reward and accuracy."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    x, mean = _series(steps, "reward")
    _, std = _series(steps, "reward_std")
    ax.plot(x, mean, lw=1.2, label="train reward (sampled, mean)")
    if len(std) == len(mean):
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        alpha=0.15)
    for key, style, label in (("val_reward", "o-", "held-out reward (greedy)"),
                              ("val_accuracy", "s--", "held-out accuracy (greedy)")):
        ex, ey = _series(evals, key)
        if ey:
            ax.plot(ex, ey, style, label=label)
    ax.set(xlabel="step", ylabel="reward", title=f"{title} reward".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(out_dir) / "reward.png")


def plot_expert_load(records: list[dict], path: Path, title: str = "") -> Path:
    """One panel per MoE layer: each expert's share of the routed tokens x experts (1 =
    balanced) over the logged steps (monitoring/expert_metrics.py writes ``moe/layerN/load``)."""
    logged = [r for r in records if "moe/layer0/load" in r]
    layers = 0
    while f"moe/layer{layers}/load" in logged[0]:
        layers += 1
    cols = min(layers, 4)
    rows = -(-layers // cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows))
    steps = [r["step"] for r in logged]
    for i in range(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        loads = list(zip(*[r[f"moe/layer{i}/load"] for r in logged]))   # per expert
        for e, load in enumerate(loads):
            ax.plot(steps, load, lw=1, label=f"expert {e}")
        ax.axhline(1.0, color="black", lw=0.6, ls="--")
        ax.set(xlabel="step", ylabel="load / mean load", title=f"layer {i}")
        ax.grid(alpha=0.3)
    if len(loads) <= 16:
        fig.axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title} expert load per layer".strip())
    return _save(fig, path)
