"""The likelihood judge's choices, measured (docs/data-generation.md): what each answer's log-likelihood is
compared against (the contrast persona's prompt, or the prompt with no persona), whether the score is per
token or summed, and the margin; on the known-truth set (kept pairs, and how many agree with the truth) and,
given a `jobs.generate_data` folder made with the likelihood judge, on its generated rows (kept rows).

    .venv/bin/python benchmarks/likelihood_judge.py                      # SmolLM2-135M, ~2 min on 2 cores
    .venv/bin/python benchmarks/likelihood_judge.py --generated data/generated --out results.json

The known-truth pairs are scored in this process (no Ray) by the judge's own steps (ScoringRows, then
CompletionScorer); a generated folder's scores are the four log-probs its judged.jsonl records.
"""

from __future__ import annotations

import argparse
import json
import os
import time

PER_TOKEN_MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
SUMMED_MARGINS = (0.0, 0.5, 1.0, 2.0, 5.0)


def scores(logps: dict[str, float], tokens: dict[str, int]) -> dict[str, float]:
    """The judge's score per token (as it decides) and summed (its formula with every answer one token long)."""
    from fspo_ray.generate.judging import likelihood_outcome

    return {"per token": likelihood_outcome(logps, tokens, 0)[1],
            "summed": likelihood_outcome(logps, {"own": 1, "contrast": 1}, 0)[1]}  # fmt: skip


def known_truth_scores(model: str, seed: int) -> list[dict]:
    """Each known-truth pair's truth and its score under each baseline, per token and summed."""
    from fspo_ray.generate.judging import LOGPS, ScoringRows
    from fspo_ray.generate.known_truth import known_truth_comparisons
    from fspo_ray.logprobs import CompletionScorer
    from fspo_ray.models import resolve_model

    path = resolve_model(model)
    rows = known_truth_comparisons(seed)
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    # ScoringRows scores both answers after `description`'s prompt and after `contrast_description`'s: as
    # the judge does, and with the second replaced by the writer's prompt with no persona in it.
    baselines = {"contrast persona": batch, "no persona": {**batch, "contrast_description": [""] * len(rows)}}
    scorer = CompletionScorer({"judge": path})
    scored = {name: scorer(ScoringRows(path)(b)) for name, b in baselines.items()}
    results = []
    for i, row in enumerate(rows):
        result = {"truth": row["truth"]}
        for name, s in scored.items():
            persona, base = 2 * i, 2 * i + 1  # ScoringRows' two rows per comparison, the baseline's second
            logps = dict(zip(LOGPS, (s["judge_chosen"][persona], s["judge_chosen"][base],
                                     s["judge_rejected"][persona], s["judge_rejected"][base])))  # fmt: skip
            tokens = {"own": len(s["chosen_ids"][persona]), "contrast": len(s["rejected_ids"][persona])}
            result.update({f"{name}, {kind}": value for kind, value in scores(logps, tokens).items()})
        results.append(result)
    return results


def generated_scores(folder: str) -> list[dict]:
    """Each likelihood-judged row of a generate_data folder, scored per token and summed."""
    with open(os.path.join(folder, "judged.jsonl")) as f:
        judged = [row for row in map(json.loads, f) if "logps" in row]  # not a malformed answer's row
    return [{f"contrast persona, {kind}": value for kind, value in scores(row["logps"], row["tokens"]).items()}
            for row in judged]  # fmt: skip


def table(scores: list[dict]) -> dict:
    """Per variant and margin: pairs kept, how many of them name the own answer, and (where the truth is
    known) how many agree with it."""
    out = {}
    for variant in scores[0].keys() - {"truth"}:
        margins = PER_TOKEN_MARGINS if variant.endswith("per token") else SUMMED_MARGINS
        out[variant] = []
        for margin in margins:
            kept = [s for s in scores if abs(s[variant]) > margin]
            line = {"margin": margin, "pairs": len(scores), "kept": len(kept),
                    "own_preferred": sum(s[variant] > 0 for s in kept)}  # fmt: skip
            if "truth" in scores[0]:
                line["agree"] = sum((s[variant] > 0) == (s["truth"] == "own") for s in kept)
            out[variant].append(line)
    return dict(sorted(out.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the judge model: a preset or HF folder")
    parser.add_argument("--generated", help="a jobs.generate_data folder made with judge=likelihood")
    parser.add_argument("--seed", type=int, default=0, help="the known-truth set's seed (which slot is 'own')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the tables here as JSON")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    results = {"known truth": table(known_truth_scores(args.model, args.seed))}
    results["known truth seconds"] = round(time.monotonic() - started, 1)
    if args.generated:
        results["generated"] = table(generated_scores(args.generated))
    for part in ("known truth", "generated"):
        for variant, lines in results.get(part, {}).items():
            print(f"{part}, {variant}:")
            for line in lines:
                kept, agree = line["kept"], line.get("agree")
                agreement = f", {agree} agree ({agree / kept:.1%})" if agree is not None and kept else ""
                print(f"  margin {line['margin']:g}: kept {kept} of {line['pairs']} ({kept / line['pairs']:.0%}), "
                      f"{line['own_preferred']} for the own answer{agreement}")  # fmt: skip
    print(f"known truth scored in {results['known truth seconds']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
