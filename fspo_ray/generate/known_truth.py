"""Known-truth validation: how often a judge's kept labels are right, on pairs whose answer is known.

Synthetic users (fspo_ray/data/synthetic.py) prefer one pole of one or two answer properties (tone,
length, format, mood), and their descriptions say so ("This user prefers formal and brief answers.").
A pair's two answers answer the same question and differ exactly on some of those properties, the
preferred one holding the user's poles; the contrast persona is the one the other answer holds the poles
of. The set is fixed: every profile with one property (8) and every trained profile with two (18), four
pairs each, 104 pairs. Which answer of a pair stands as the persona's "own" is drawn with the seed, so a
judge that always names the same slot agrees with the truth half the time.

Both judges label the set (the likelihood judge only where the judge model is local); `validation.jsonl`
keeps every pair with each judge's verdict, and the report says per judge what was kept, undecided,
inconsistent and malformed, how many kept labels agree with the truth, and how often the generative
judge's two orders agreed (position consistency; the likelihood judge scores each answer alone: none).
"""

from __future__ import annotations

import json
import os
import random

from fspo_ray.data.synthetic import make_users, user_pairs
from fspo_ray.generate.config import GenerateDataConfig, is_endpoint
from fspo_ray.generate.judging import tally, verdicts

PAIRS_PER_USER = 4


def known_truth_comparisons(seed: int) -> list[dict]:
    """The comparison rows of the set, each with its `truth`: the slot (own | contrast) the user prefers."""
    users = [*make_users(8, 0, dims_per_user=1), *make_users(18, 0, dims_per_user=2)]  # each profile once
    swap = random.Random(f"known-truth/{seed}")
    rows = []
    for n, user in enumerate(users):
        for k, pair in enumerate(user_pairs(user, PAIRS_PER_USER, seed)):
            swapped = swap.random() < 0.5
            own, contrast = (pair.dispreferred, pair.preferred) if swapped else (pair.preferred, pair.dispreferred)
            rows.append({"key": f"known-{n:02d}-{k}", "question": pair.question, "description": pair.user_description,
                         "contrast_description": pair.dispreferred_description, "own": own, "contrast": contrast,
                         "truth": "contrast" if swapped else "own"})  # fmt: skip
    return rows


def judge_record(judge: str, comparisons: list[dict], judged: dict[str, dict]) -> dict:
    """One judge's record on the set: `tally`'s counts, the kept fraction, agreement with the truth on the
    kept pairs and, for the generative judge, the share of well-formed verdicts whose two orders agreed."""
    counts = tally(judged.values())
    right = sum(judged[c["key"]]["outcome"] == c["truth"] for c in comparisons)
    both_orders = counts["kept"] + counts["inconsistent"]
    return {
        "pairs": len(comparisons),
        **counts,
        "kept_fraction": counts["kept"] / len(comparisons),
        "agree_with_truth": right,
        "agreement": right / counts["kept"] if counts["kept"] else None,
        "position_consistency": counts["kept"] / both_orders if judge == "generative" and both_orders else None,
    }


def validate_judges(cfg: GenerateDataConfig, judge_model: str) -> dict:
    """Both judges (the likelihood judge where `judge_model` is local) on the known-truth set; writes
    `validation.jsonl` in `cfg.out` and returns each judge's record."""
    comparisons = known_truth_comparisons(cfg.seed)
    judges = ("generative",) if is_endpoint(judge_model) else ("likelihood", "generative")
    judged = {judge: dict(verdicts(judge, judge_model, comparisons, cfg, f"known truth, {judge} judge"))
              for judge in judges}  # fmt: skip
    with open(os.path.join(cfg.out, "validation.jsonl"), "w", encoding="utf-8") as f:
        for row in comparisons:
            f.write(json.dumps({**row, **{judge: judged[judge][row["key"]] for judge in judges}}) + "\n")
    return {"pairs": len(comparisons), **{judge: judge_record(judge, comparisons, judged[judge]) for judge in judges}}
