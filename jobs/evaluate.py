"""Evaluate a personalized model on held-out users: `python -m jobs.evaluate key=value ...`.

    python -m jobs.evaluate model=runs/ipo datasets=[data/synthetic/test.jsonl] \
        users_file=data/synthetic/users.json out=runs/ipo/eval baselines=[few_shot_base,oracle_prompt]

Writes report.json, per_user.csv and accuracy_vs_shots.png to `out`, and prints a summary table.
See fspo_ray/evaluate/run.py for every key.
"""

from __future__ import annotations

from fspo_ray.config import parse_overrides, run_job
from fspo_ray.evaluate.run import EvaluateConfig, evaluate


def summary(report: dict) -> str:
    ceiling = {row["k"]: row["accuracy"] for row in report.get("bayes_optimal_by_shots", [])}
    lines = ["shots  n     accuracy [95% CI]       " + ("bayes_optimal  " if ceiling else "") +
             "margin    shots used (mean; episodes that lost some)"]  # fmt: skip
    for row in report["accuracy_by_shots"]:
        low, high = row["accuracy_ci"]
        best = f"{ceiling[row['k']]:.3f}          " if ceiling else ""
        lines.append(
            f"{row['k']:<6} {row['n']:<5} {row['accuracy']:.3f} [{low:.3f}, {high:.3f}]   {best}{row['margin']:+.4f}   "
            f"{row['shots_used_mean']:.2f}; {row['episodes_that_lost_shots']}"
        )
    gain = report.get("gain_over_zero_shots")
    if gain:
        low, high = gain["ci"]
        lines.append(f"learning from shots: {gain['points']:+.1f} points of accuracy at {gain['k']} shots over 0 shots "
                     f"[95% CI {low:+.1f}, {high:+.1f}] on the same {gain['n']} episodes")  # fmt: skip
    for name, result in report.get("win_rate_vs_base", {}).items():
        if name != "examples":
            low, high = result["ci"]
            lines.append(
                f"win rate vs base, {name}: {result['win_rate']:.3f} [{low:.3f}, {high:.3f}] "
                f"({result['wins']} wins, {result['losses']} losses, {result['dropped_inconsistent']} dropped)"
                + (f"; on task: {result['on_task']:.0%} vs base {result['base_on_task']:.0%}" if "on_task" in result
                   else "")
            )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    from fspo_ray.console import job_console

    cfg = parse_overrides(EvaluateConfig, argv)
    log = f"{cfg.out.rstrip('/')}.log"  # beside `out`, which must be empty or hold an earlier report
    print(f"evaluation: Ray's and the libraries' output goes to {log}", flush=True)
    with job_console(log, cfg.verbose):
        report = evaluate(cfg)
    print(summary(report))
    print(f"report: {cfg.out}/report.json, per user: {cfg.out}/per_user.csv, plot: {cfg.out}/accuracy_vs_shots.png")
    return report


if __name__ == "__main__":
    run_job(main)
