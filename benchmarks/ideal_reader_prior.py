"""Two ideal readers beside a demo's model, split by whether a training user holds the held-out user's
pole combination: one that weighs every combination alike (the evaluation's `bayes_optimal`) and one
whose prior is the training users' own preferences (what the training data can teach); then, at the largest
k, each pole combination's held-out users beside the first reader, the largest gap first.

In the default synthetic world half the held-out users hold a combination no training user holds
(synthetic.py), and the two readers part on those users; in the demo's (`held_out_combinations: false`) no
held-out user does, the two readers nearly agree, and the per-combination table says where a gap sits. Run
after `make demo` and an evaluation of all its held-out episodes:

    .venv/bin/python -m jobs.evaluate model=runs/demo/runs/ipo "datasets=[runs/demo/data/test.jsonl]" \
        users_file=runs/demo/data/users.json out=runs/demo/eval1024 max_shots=6 n_episodes=1024 \
        targets_per_prompt=4 "baselines=[bayes_optimal]" judge=none
    .venv/bin/python benchmarks/ideal_reader_prior.py demo=runs/demo eval=runs/demo/eval1024
"""

import collections
import csv
import json
import os
import statistics
import sys

from omegaconf import OmegaConf

from fspo_ray.data.episodes import build_episodes
from fspo_ray.data.readers import read_pairs
from fspo_ray.data.synthetic import bayes_optimal_choice

DEFAULTS = dict(demo="runs/demo", eval="runs/demo/eval1024", shots=6, targets=4, eval_shots=[1, 2, 4, 6], seed=0)


def main(argv: list[str]) -> None:
    cfg = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(argv))
    users = json.load(open(os.path.join(cfg.demo, "data", "users.json")))
    trained_prior = [u["preferences"] for u in users.values() if u["split"] == "train"]
    episodes, _ = build_episodes(read_pairs(os.path.join(cfg.demo, "data", "test.jsonl")), shots=cfg.shots,
                                 passes=1, seed=cfg.seed, targets=cfg.targets)  # fmt: skip
    readers = {"every combination alike": None, "the training users' prior": trained_prior}
    ideal = collections.defaultdict(list)
    last = max(cfg.eval_shots)
    by_user = collections.defaultdict(list)  # the first reader's verdicts at the largest k, per held-out user
    for name, profiles in readers.items():
        for k in cfg.eval_shots:
            for e in episodes:
                user = users[e.user_id]
                verdict = bayes_optimal_choice(
                    [(s.preferred, s.dispreferred) for s in e.first_shots(k).shots],
                    (e.query.preferred, e.query.dispreferred), len(user["preferences"]),
                    label_noise=user["label_noise"], preferred_only=True, profiles=profiles)  # fmt: skip
                ideal[name, k, user["novel_combination"]].append(verdict)
                if profiles is None and k == last:
                    by_user[e.user_id].append(verdict)
    model = collections.defaultdict(lambda: [0.0, 0])
    model_by_user = {}
    with open(os.path.join(cfg.eval, "per_user.csv")) as f:
        for row in csv.DictReader(f):
            if row["measure"] == "accuracy":
                kept = model[int(row["k"]), users[row["user_id"]]["novel_combination"]]
                kept[0] += float(row["value"]) * int(row["n"])
                kept[1] += int(row["n"])
                if int(row["k"]) == last:
                    model_by_user[row["user_id"]] = float(row["value"])
    print(f"{len(episodes)} held-out episodes; accuracy at k shots")
    print(f"{'users':<34}{'k':<4}{'n':<6}{'model':<8}" + "".join(f"{name:<28}" for name in readers))
    sides = {"a combination training users hold": [False], "a combination none holds": [True], "all": [False, True]}
    for side, marks in sides.items():
        for k in cfg.eval_shots:
            right, n = (sum(model[k, mark][i] for mark in marks) for i in (0, 1))
            if not n:  # no held-out user on this side (held_out_combinations=false)
                continue
            print(f"{side:<34}{k:<4}{n:<6}{right / n:<8.3f}" + "".join(
                f"{statistics.mean([v for mark in marks for v in ideal[name, k, mark]]):<28.3f}" for name in readers))
    # Per combination: where a gap that the sides above average over sits (each user's episodes alike).
    print(f"\nat {last} shots, per combination: its held-out users, the ideal reader (every "
          "combination alike) and the model")
    combos = collections.defaultdict(list)
    for user_id, verdicts in by_user.items():
        combo = " + ".join(users[user_id]["preferences"].values())
        combos[combo].append((statistics.mean(verdicts), model_by_user[user_id]))
    for combo, pairs in sorted(combos.items(), key=lambda c: -statistics.mean(i - m for i, m in c[1])):
        best, got = (statistics.mean(p[i] for p in pairs) for i in (0, 1))
        print(f"{combo:<28}{len(pairs):<4}ideal {best:.3f}  model {got:.3f}  below {best - got:+.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
