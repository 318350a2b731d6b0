"""Make an FSPO data set: personas × questions → answers → a judge → labelled pairs.

    python -m jobs.generate_data out=data/generated n_personas=20 n_questions=20 validate=true
    python -m jobs.generate_data out=data/mine personas=my_personas.jsonl questions=my_questions.txt \\
        model=/models/writer judge_model=https://judge.example/ concurrency=8

Writes train.jsonl and test.jsonl (canonical pairs, `jobs.train datasets=[OUT/train.jsonl]` reads them),
summary.json and the stages' records; a re-run with the same out resumes. `--help` lists every key.
"""

from __future__ import annotations

from fspo_ray.config import parse_overrides, run_job
from fspo_ray.generate.config import GenerateDataConfig, validate
from fspo_ray.generate.run import generate_data


def describe_record(name: str, record: dict) -> str:
    """One line of a judge's known-truth record."""
    agreement = "no pair kept" if record["agreement"] is None else (
        f"{record['agreement']:.0%} of those agree with the truth ({record['agree_with_truth']})")
    consistency = record["position_consistency"]
    return (f"known truth, {name} judge: kept {record['kept']} of {record['pairs']} pairs, {agreement}; "
            f"{record['undecided']} undecided, {record['inconsistent']} order-inconsistent, "
            f"{record['malformed_verdict']} malformed" +
            (f"; its two orders agreed on {consistency:.0%}" if consistency is not None else ""))  # fmt: skip


def describe_summary(summary: dict) -> str:
    """The line that says what the judge made of the generated rows: kept, and each reason for a drop."""
    margin = f", margin {summary['judge_margin']:g} nats/token" if "judge_margin" in summary else ""
    return (f"{summary['judge']} judge{margin}: kept {summary['kept']} of {summary['rows']} rows "
            f"({summary['kept_own_answer_preferred']} preferring the persona's own answer); dropped: "
            f"{summary['undecided']} undecided, {summary['inconsistent']} order-inconsistent, "
            f"{summary['malformed_verdict']} malformed verdicts, {summary['malformed_answer']} malformed answers; "
            f"{summary['answers']['reached_max_new_tokens']} of {summary['answers']['written']} answers reached "
            f"max_new_tokens; {summary['seconds']:.0f} s")  # fmt: skip


def main(argv: list[str]) -> dict:
    from fspo_ray.console import job_console

    cfg = parse_overrides(GenerateDataConfig, argv)
    validate(cfg)
    log = f"{cfg.out.rstrip('/')}.log"
    print(f"generate data: Ray's and the libraries' output goes to {log}", flush=True)
    with job_console(log, cfg.verbose):
        summary = generate_data(cfg)
    for name, record in summary.get("validation", {}).items():
        if name != "pairs":
            print(describe_record(name, record))
    print(describe_summary(summary))
    biased = max(summary["inconsistent_naming_first_in_both_orders"],
                 summary["inconsistent_naming_second_in_both_orders"])
    if summary["kept"] == 0 and biased:
        print(f"no pair kept: in {biased} of {summary['judged']} rows the judge named the same position in both "
              "orders, a position-biased judge; judge=likelihood (local models), a larger judge_model or an "
              "endpoint labels pairs")  # fmt: skip
    print(f"train: {cfg.out}/train.jsonl ({summary['train']['pairs']} pairs, {summary['train']['personas']} "
          f"personas), test: {cfg.out}/test.jsonl ({summary['test']['pairs']} pairs, "
          f"{summary['test']['personas']} personas), summary: {cfg.out}/summary.json")  # fmt: skip
    return summary


if __name__ == "__main__":
    run_job(main)
