"""PNG plots of a run: accuracy per round per method, and final accuracy against θ."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _theta_of(key: str) -> float | None:
    if key == "promptfl":
        return 0.0
    if key == "local":
        return 1.0
    if key.startswith("promptfolio-") and key != "promptfolio-auto":
        return float(key.removeprefix("promptfolio-"))
    return None


def accuracy_per_round(rounds_by_method: dict[str, list[tuple[int, float, float]]], path: Path, title: str) -> None:
    """rounds_by_method: key -> [(round, personal %, general %)]."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for key, rows in sorted(rounds_by_method.items()):
        r = [x[0] for x in rows]
        axes[0].plot(r, [x[1] for x in rows], marker=".", label=key)
        axes[1].plot(r, [x[2] for x in rows], marker=".", label=key)
    for ax, name in zip(axes, ("personalized (own test split)", "generalization (shared balanced set)")):
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("client-mean accuracy %")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_theta(final: dict[str, tuple[float, float]], path: Path, title: str,
                      errors: dict[str, tuple[float, float]] | None = None) -> None:
    """final: key -> (personal %, general %) at the last round; only methods with a fixed θ are placed."""
    points = sorted((_theta_of(k), v, (errors or {}).get(k, (0.0, 0.0))) for k, v in final.items()
                    if _theta_of(k) is not None)
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    thetas = [p[0] for p in points]
    for i, name in enumerate(("personalized", "generalization")):
        ax.errorbar(thetas, [p[1][i] for p in points], yerr=[p[2][i] for p in points], marker="o", capsize=3,
                    label=name)
    for key, (personal, _) in final.items():
        if key in ("zero-shot", "promptfolio-auto"):
            ax.axhline(personal, ls="--", lw=1, color="grey" if key == "zero-shot" else "green",
                       label=f"{key} (personalized)")
    ax.set_xlabel("θ (0 = PromptFL, 1 = local only)")
    ax.set_ylabel("client-mean accuracy %")
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(metrics: dict, out_dir: Path) -> list[Path]:
    from training.outputs import method_means

    by_method: dict[str, list[tuple[int, float, float]]] = {}
    for record in metrics["rounds"]:
        personal, general = method_means(record["eval"], "personal"), method_means(record["eval"], "general")
        for key in personal:
            by_method.setdefault(key, []).append((record["round"], personal[key], general.get(key, float("nan"))))
    out = [out_dir / "accuracy_per_round.png", out_dir / "accuracy_vs_theta.png"]
    accuracy_per_round(by_method, out[0], "federated prompt learning")
    final = {k: (v[-1][1], v[-1][2]) for k, v in by_method.items()}
    accuracy_vs_theta(final, out[1], "final accuracy against θ")
    return [p for p in out if p.exists()]
