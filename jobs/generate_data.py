"""Make an FSPO data set: personas × questions → answers → order-swapped judge → labelled pairs.

    python -m jobs.generate_data out=data/generated n_personas=20 n_questions=20
    python -m jobs.generate_data out=data/mine personas=my_personas.jsonl questions=my_questions.txt \
        model=/models/writer judge_model=https://judge.example/ concurrency=8

Writes train.jsonl and test.jsonl (canonical pairs, `jobs.train datasets=[OUT/train.jsonl]` reads them),
summary.json and the stages' records; a re-run with the same out resumes. `--help` lists every key.
"""

from __future__ import annotations

from fspo_ray.config import parse_overrides, run_job
from fspo_ray.generate.run import GenerateDataConfig, generate_data, validate


def main(argv: list[str]) -> dict:
    from fspo_ray.console import job_console

    cfg = parse_overrides(GenerateDataConfig, argv)
    validate(cfg)
    log = f"{cfg.out.rstrip('/')}.log"
    print(f"generate data: Ray's and the libraries' output goes to {log}", flush=True)
    with job_console(log, cfg.verbose):
        summary = generate_data(cfg)
    print(f"kept {summary['kept']} of {summary['rows']} rows ({summary['kept_own_answer_preferred']} preferring "
          f"the persona's own answer); dropped: {summary['dropped_inconsistent']} order-inconsistent, "
          f"{summary['dropped_malformed_verdict']} malformed verdicts, {summary['dropped_malformed_answer']} "
          f"malformed answers; {summary['answers']['reached_max_new_tokens']} of {summary['answers']['written']} "
          f"answers reached max_new_tokens; {summary['seconds']:.0f} s")  # fmt: skip
    biased = max(summary["inconsistent_naming_first_in_both_orders"],
                 summary["inconsistent_naming_second_in_both_orders"])
    if summary["kept"] == 0 and biased:
        print(f"no pair kept: in {biased} of {summary['judged']} rows the judge named the same position in both "
              "orders, a position-biased judge; a larger judge_model (or an endpoint) labels pairs")  # fmt: skip
    print(f"train: {cfg.out}/train.jsonl ({summary['train']['pairs']} pairs, {summary['train']['personas']} "
          f"personas), test: {cfg.out}/test.jsonl ({summary['test']['pairs']} pairs, "
          f"{summary['test']['personas']} personas), summary: {cfg.out}/summary.json")  # fmt: skip
    return summary


if __name__ == "__main__":
    run_job(main)
