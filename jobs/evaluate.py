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
    ceiling = {row["k"]: row for row in report.get("bayes_optimal_by_shots", [])}
    lines = ["shots  n     accuracy [95% CI]       " + ("bayes_optimal  below it [95% CI]          " if ceiling else "")
             + "margin    shots used (mean; episodes that lost some)"]  # fmt: skip
    for row in report["accuracy_by_shots"]:
        low, high = row["accuracy_ci"]
        best = ""
        if ceiling:
            gap = ceiling[row["k"]].get("model_gap")
            below = f"{gap['gap']:+.3f} [{gap['ci'][0]:+.3f}, {gap['ci'][1]:+.3f}]" if gap else ""
            best = f"{ceiling[row['k']]['accuracy']:.3f}          {below:<28}"
        lines.append(
            f"{row['k']:<6} {row['n']:<5} {row['accuracy']:.3f} [{low:.3f}, {high:.3f}]   {best}{row['margin']:+.4f}   "
            f"{row['shots_used_mean']:.2f}; {row['episodes_that_lost_shots']}"
        )
    sides = ceiling[max(ceiling)].get("model_gap_by_combination") if ceiling else None
    if sides:
        shown = [f"{side} {g['gap']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] on {g['n']}"
                 for side, g in (("trained", sides["trained"]), ("novel", sides["novel"]))]  # fmt: skip
        lines.append(f"below the ideal reader at {max(ceiling)} shots, by whether a training user holds the user's "
                     f"pole combination: {'; '.join(shown)}")  # fmt: skip
    for key, what in (("gain_over_zero_shots", "learning from shots"), ("gain_over_one_shot", "reading several")):
        gain = report.get(key)
        if gain:
            low, high = gain["ci"]
            fewer = f"{gain['over']} shot" + ("s" if gain["over"] != 1 else "")
            lines.append(f"{what}: {gain['points']:+.1f} points of accuracy at {gain['k']} shots over {fewer} "
                         f"[95% CI {low:+.1f}, {high:+.1f}] on the same {gain['n']} episodes")  # fmt: skip
    systems = report.get("systems_by_shots", {})
    if systems:
        ks = [row["k"] for row in systems["fspo"]]
        n = systems["fspo"][0]["n"]
        lines.append(f"\nsystems on the same {n} target pairs at every k (accuracy; gain at {ks[-1]} shots over 0, "
                     "95% CI of the paired difference):")  # fmt: skip
        lines.append(f"{'system':<22}" + "".join(f"k={k:<6}" for k in ks) + "gain")
        for name, rows in systems.items():
            gain = rows[-1].get("gain_over_0")
            shown = f"{gain['points']:+.1f} [{gain['ci'][0]:+.1f}, {gain['ci'][1]:+.1f}]" if gain else ""
            lines.append(f"{name:<22}" + "".join(f"{row['accuracy']:<8.3f}" for row in rows) + shown)
    for key in (k for k in report if k.startswith("win_rate_vs_")):
        opponent = key.removeprefix("win_rate_vs_")
        for name, result in report[key].items():
            if name == "examples":
                continue
            low, high = result["ci"]
            if "ties" in result:  # judge=votes: the people's own votes decide
                lines.append(f"win rate vs {opponent}, {name}, judged by each person's own vote at {result['k']} "
                             f"shots: {result['win_rate']:.3f} [{low:.3f}, {high:.3f}] ({result['wins']} wins, "
                             f"{result['losses']} losses, {result['ties']} pairs both ranked alike)")  # fmt: skip
                continue
            lines.append(
                f"win rate vs {opponent}, {name}: {result['win_rate']:.3f} [{low:.3f}, {high:.3f}] "
                f"({result['wins']} wins, {result['losses']} losses, {result['dropped_inconsistent']} dropped)"
                + (f"; on task: {result['on_task']:.0%} vs {opponent} {result[f'{opponent}_on_task']:.0%}"
                   if "on_task" in result else "")
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
