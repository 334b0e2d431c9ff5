"""Privacy/utility benchmark: central DP on the global prompt (a script, not a test).

    .venv/bin/python bench/privacy.py [--seeds 3] [--rounds 5] [--noise 0,1,4,16] [--dp client]
                                      [--clip-norm 0.1] [--out runs/bench-privacy]

Embedded world, 10 clients; per noise multiplier σ (0 = no DP: plain num-examples-weighted
FedAvg) and seed, one Flower run trains PromptFL, PromptFolio at fixed θ = 0.4, PromptFolio with
per-client θ and the local-only prompt side by side (paired data). Prints mean ± std over seeds
of personalized and generalization accuracy per method next to the ε (at δ = 1e-5) the run
spent, and whether the mix keeps its personalized accuracy as the noise grows; writes
report.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from methods import run_train  # noqa: E402 - bench/methods.py: one training run and its metrics
from training.simulation import in_private_netns, run_isolated  # noqa: E402

METHODS = "promptfl,promptfolio-0.4,promptfolio-auto,local"
LABELS = {"promptfl": "PromptFL", "promptfolio-0.4": "PromptFolio θ=0.4", "promptfolio-auto": "PromptFolio per-client θ",
          "local": "local only (reference)"}


def run_one(out: Path, noise: float, seed: int, args) -> dict:
    cmd = [sys.executable, "-m", "promptfolio.cli", "train", "--network", "host", "--methods", args.methods,
           "--clients", str(args.clients), "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs),
           "--images-per-class", str(args.images_per_class), "--seed", str(seed), "--out", str(out)]
    if noise > 0:
        cmd += ["--dp", args.dp, "--dp-noise", str(noise), "--dp-clip-norm", str(args.clip_norm)]
    return run_train(cmd, out)


def summarise(runs: list[dict], order: list[str]) -> dict:
    row: dict = {"epsilon": [r["privacy"]["epsilon"] for r in runs if "privacy" in r]}
    for m in order:
        personal = [r["final"][m]["personal_mean"] for r in runs]
        general = [r["final"][m]["general_mean"] for r in runs]
        row[m] = {"personal": (float(np.mean(personal)), float(np.std(personal))),
                  "general": (float(np.mean(general)), float(np.std(general)))}
    row["wall_seconds"] = float(np.mean([r["wall_seconds"] for r in runs]))
    return row


def table(results: dict[float, dict], order: list[str], args) -> str:
    head = "| σ | ε (δ=1e-5) | " + " | ".join(f"{LABELS.get(m, m)} pers. / gen." for m in order) + " |"
    lines = [f"Embedded world, {args.clients} clients, {args.rounds} rounds × {args.local_epochs} local epochs, "
             f"{args.seeds} seeds (mean ± std of the client-mean accuracy %); DP: `--dp {args.dp}`, clip norm "
             f"{args.clip_norm}; σ = 0: no DP", "", head, "|" + "---|" * (2 + len(order))]
    for noise, row in sorted(results.items()):
        eps = f"{np.mean(row['epsilon']):.1f}" if row["epsilon"] else "∞ (no DP)"
        cells = [f"{row[m]['personal'][0]:.1f} ± {row[m]['personal'][1]:.1f} / "
                 f"{row[m]['general'][0]:.1f} ± {row[m]['general'][1]:.1f}" for m in order]
        lines.append(f"| {noise:g} | {eps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: dict[float, dict], order: list[str]) -> str:
    """How much personalized accuracy each method keeps at the largest noise, against no noise."""
    levels = sorted(results)
    low, high = results[levels[0]], results[levels[-1]]
    parts = []
    for m in order:
        before, after = low[m]["personal"][0], high[m]["personal"][0]
        parts.append(f"{LABELS.get(m, m)} {before:.1f} -> {after:.1f} ({after - before:+.1f})")
    return f"personalized accuracy from σ = {levels[0]:g} to σ = {levels[-1]:g}: " + "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--noise", default="0,1,4,16", help="noise multipliers σ; 0 = no DP")
    parser.add_argument("--dp", choices=["client", "server"], default="client", help="where updates are clipped")
    parser.add_argument("--clip-norm", type=float, default=0.1)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-privacy"))
    args = parser.parse_args()
    from training.config import parse_method

    try:
        order = [parse_method(m).key for m in args.methods.split(",")]
        levels = [float(x) for x in args.noise.split(",")]
    except ValueError as e:
        parser.error(str(e))
    if not in_private_netns():  # Ray stays on loopback inside a private network namespace
        return run_isolated([sys.executable, *sys.argv])
    out = Path(args.out)
    results: dict[float, dict] = {}
    for noise in levels:
        runs = [run_one(out / f"sigma{noise:g}-s{seed}", noise, seed, args) for seed in range(args.seeds)]
        results[noise] = summarise(runs, order)
        print(f"σ = {noise:g} done ({results[noise]['wall_seconds']:.0f} s per run)", file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
        (out / "report.md").write_text(table(results, order, args) + "\n")  # so far
    report = table(results, order, args) + "\n\n" + verdict(results, order)
    (out / "report.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
