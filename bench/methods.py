"""Benchmark of the federated methods on the embedded world (a script, not a test).

    .venv/bin/python bench/methods.py [--seeds 5] [--rounds 20] [--recipe official] [--out runs/bench-methods]
                                      [--methods local,promptfl,promptfolio-auto]

For β in {0.1, 0.5} and two shift settings (each client its own style; all clients one shared
style), 10 clients, every method trains side by side in one Flower run per seed (paired data).
Prints mean ± std over seeds of personalized and generalization accuracy per method, bytes per
client per round, wall time, and (when local, promptfl and promptfolio-auto all run) the
per-client comparison of auto with each client's better extreme; saves per-setting plots and all
numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.simulation import in_private_netns, run_isolated  # noqa: E402

METHODS = "zero-shot,local,promptfl,promptfolio-0.2,promptfolio-0.4,promptfolio-0.6,promptfolio-0.8,promptfolio-auto"
AUTO, EXTREMES = "promptfolio-auto", ("local", "promptfl")
BAD_GAP = 10.0  # points below the client's better extreme that count as a failure of the per-client θ



def run_one(out: Path, beta: float, shift: str, seed: int, args) -> dict:
    cmd = [sys.executable, "-m", "promptfolio.cli", "train", "--network", "host", "--methods", args.methods,
           "--clients", str(args.clients), "--rounds", str(args.rounds), "--beta", str(beta), "--shift", shift,
           "--seed", str(seed), "--recipe", args.recipe, "--out", str(out)]
    return run_train(cmd, out)


def run_train(cmd: list[str], out: Path) -> dict:
    """One `promptfolio train` command, its output in `<out>.log`: its metrics.json plus wall seconds."""
    start = time.time()
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"run failed ({rc}); see {log}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.time() - start
    return metrics


def style_of_client(metrics: dict, pid: int) -> str:
    plan = json.loads((Path(metrics["config"]["out_dir"]) / "plan.json").read_text())
    return plan["clients"][pid]["style"][0]


def per_client_vs_extremes(runs: list[dict]) -> dict:
    """Auto against each client's own better extreme, max(local, promptfl), pooled over seeds."""
    gaps, thetas = [], []
    for r in runs:
        final = r["final"]
        best = np.maximum(final["local"]["per_client_personal"], final["promptfl"]["per_client_personal"])
        gaps.extend(np.asarray(final[AUTO]["per_client_personal"]) - best)
        thetas.extend(final[AUTO]["per_client_theta"])
    gaps = np.asarray(gaps)
    seed_means = {m: float(np.mean([r["final"][m]["personal_mean"] for r in runs])) for m in (AUTO, *EXTREMES)}
    return {"clients": int(len(gaps)), "at_least_best": int((gaps >= 0).sum()),
            "worse_by_more_than_10": int((gaps < -BAD_GAP).sum()), "mean_gap": float(gaps.mean()),
            "worst_gap": float(gaps.min()), "theta_mean": float(np.mean(thetas)),
            "theta_hist": {f"{t:g}": int(c) for t, c in zip(*np.unique(np.round(thetas, 1), return_counts=True))},
            "auto_minus_better_method": seed_means[AUTO] - max(seed_means[m] for m in EXTREMES)}


def summarise(runs: list[dict], order: list[str]) -> dict:
    rows = {}
    for m in order:
        personal = [r["final"][m]["personal_mean"] for r in runs]
        general = [r["final"][m]["general_mean"] for r in runs]
        rows[m] = {"personal": (float(np.mean(personal)), float(np.std(personal))),
                   "general": (float(np.mean(general)), float(np.std(general)))}
    train_rows = [row for r in runs for rec in r["rounds"] for row in rec["train"]]
    n_keys = max(1, sum(1 for m in order if m not in ("zero-shot", "local")))
    per_round = np.mean([row["bytes-sent"] + row["bytes-received"] for row in train_rows])
    # per client per round for ONE method with a global prompt (the run carries n_keys of them)
    rows["_bytes_per_client_round_one_method"] = float(per_round / n_keys)
    rows["_wall_seconds_mean"] = float(np.mean([r["wall_seconds"] for r in runs]))
    if not {AUTO, *EXTREMES} <= set(order):
        return rows
    rows["_per_client"] = per_client_vs_extremes(runs)
    # per client group (style): does the per-client θ match or beat the better extreme?
    groups: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        last = r["rounds"][-1]["eval"]
        for row in last:
            g = style_of_client(r, int(row["partition"]))
            d = groups.setdefault(g, {"local": [], "promptfl": [], "promptfolio-auto": []})
            for m in d:
                d[m].append(row[f"personal/{m}"])
    rows["_groups"] = {g: {m: float(np.mean(v)) for m, v in d.items()} for g, d in groups.items()}
    return rows


def table(setting: str, rows: dict, n_seeds: int, order: list[str]) -> str:
    lines = [f"### {setting} ({n_seeds} seeds, mean ± std of the client-mean accuracy %)", "",
             "| method | personalized | generalization |", "|---|---|---|"]
    for m in order:
        p, g = rows[m]["personal"], rows[m]["general"]
        lines.append(f"| {m} | {p[0]:.1f} ± {p[1]:.1f} | {g[0]:.1f} ± {g[1]:.1f} |")
    lines.append("")
    lines.append(f"bytes per client per round (one method's global prompt, both directions): "
                 f"{rows['_bytes_per_client_round_one_method']:.0f}; wall time per run ({len(order)} methods): "
                 f"{rows['_wall_seconds_mean']:.0f} s")
    if "_per_client" not in rows:
        return "\n".join(lines)
    pc = rows["_per_client"]
    lines.append(f"per-client θ vs each client's better extreme max(local, promptfl), {pc['clients']} clients: "
                 f"at least as good {pc['at_least_best']}, worse by > {BAD_GAP:g} points {pc['worse_by_more_than_10']} "
                 f"({100 * pc['worse_by_more_than_10'] / pc['clients']:.0f}%), mean gap {pc['mean_gap']:+.1f}, "
                 f"worst {pc['worst_gap']:+.1f}; client-mean auto − better method {pc['auto_minus_better_method']:+.1f}; "
                 f"mean θ {pc['theta_mean']:.2f}, θ counts {pc['theta_hist']}")
    verdicts = []
    for g, d in sorted(rows["_groups"].items()):
        best = max(d["local"], d["promptfl"])
        verdicts.append(f"{g}: auto {d['promptfolio-auto']:.1f} vs best extreme {best:.1f} "
                        f"({'matches or beats' if d['promptfolio-auto'] >= best - 0.5 else 'below'})")
    lines.append("per-client θ by client group: " + "; ".join(verdicts))
    return "\n".join(lines)


def plots(setting: str, runs: list[dict], rows: dict, out: Path, order: list[str]) -> None:
    from training.plots import accuracy_per_round, accuracy_vs_theta
    from training.outputs import method_means

    by_method: dict[str, list[tuple[int, float, float]]] = {}
    n_rounds = len(runs[0]["rounds"])
    for i in range(n_rounds):
        personal = [method_means(r["rounds"][i]["eval"], "personal") for r in runs]
        general = [method_means(r["rounds"][i]["eval"], "general") for r in runs]
        for m in order:
            by_method.setdefault(m, []).append((i + 1, float(np.mean([p[m] for p in personal])),
                                                float(np.mean([g[m] for g in general]))))
    slug = setting.replace(" ", "_").replace("=", "").replace(",", "")
    accuracy_per_round(by_method, out / f"{slug}_per_round.png", setting)
    accuracy_vs_theta({m: (rows[m]["personal"][0], rows[m]["general"][0]) for m in order},
                      out / f"{slug}_vs_theta.png", setting,
                      errors={m: (rows[m]["personal"][1], rows[m]["general"][1]) for m in order})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--betas", default="0.1,0.5")
    parser.add_argument("--shifts", default="own,shared")
    parser.add_argument("--recipe", choices=["ours", "official"], default="ours",
                        help="official: the paper's settings where ours differ (promptfolio train --recipe)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-methods"))
    parser.add_argument("--methods", default=METHODS, help="comma-separated subset, e.g. local,promptfl,promptfolio-auto")
    args = parser.parse_args()
    from training.config import parse_method

    try:
        order = [parse_method(m).key for m in args.methods.split(",")]
    except ValueError as e:
        parser.error(str(e))
    if not in_private_netns():  # Ray stays on loopback inside a private network namespace
        return run_isolated([sys.executable, *sys.argv])
    os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".cache" / "matplotlib"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, results = [], {}
    for shift in args.shifts.split(","):
        for beta in (float(b) for b in args.betas.split(",")):
            setting = f"shift={shift}, beta={beta}"
            runs = [run_one(out / f"{shift}-b{beta}-s{seed}", beta, shift, seed, args) for seed in range(args.seeds)]
            rows = summarise(runs, order)
            results[setting] = rows
            plots(setting, runs, rows, out, order)
            text = table(setting, rows, args.seeds, order)
            report.append(text)
            print(text + "\n", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text("\n\n".join(report) + "\n")
    print(f"plots, report.md and results.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
