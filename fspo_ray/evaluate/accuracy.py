"""Preference accuracy over shots: does the model read the user from the examples?

Held-out users' episodes are built once with the largest shot count N; for each k in the list the same
query pair is scored with only the episode's first k shots in the prompt, so the curve compares like with
like (and each k's prompt extends the last: all of an episode's k are scored in one packed row).
For each (episode, k), Ray Data batch inference computes the summed log-probs of the chosen and the
rejected completion under the policy and the reference; the implicit reward r = β·(lpθ − lp_ref)
ranks the preferred answer first or not (`rewards_eval/accuracies`), and r_w − r_l is the margin.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

from fspo_ray.console import streamed_rows
from fspo_ray.data.episodes import Episode, build_episode_dataset, shot_sets, use_task_shuffles
from fspo_ray.data.readers import read_pair_dataset
from fspo_ray.data.synthetic import bayes_optimal_choice
from fspo_ray.data.tokenize import PromptStyle, fit_shot_set, load_tokenizer
from fspo_ray.logprobs import SHOTS_LENGTH, TOKEN_COLUMNS, CompletionScorer
from fspo_ray.scheduling import replica_cpus


@dataclass(frozen=True)
class ShotsVariants:
    """A Ray Data batch UDF: one episode with N shots → one tokenized row holding its prompt with its first k
    shots for every k (one branch each, `BRANCH_COLUMNS`), and per k whether it fits and the shots it keeps.
    The targets of a shot set (`targets_per_prompt`) keep the same shots at each k, so their rows begin with
    the same shot ids (`SHOTS_LENGTH`) and the scorer packs them into one row too.

    The first k shots, not the newest: then every k-shot prompt starts with the longest prompt's tokens up to
    its task line, and the scorer computes the shots once for all k (`pack_branches`), where the k newest,
    renumbered from 1, would share nothing. Where a shot's edge tokenizes differently, the branch just keeps
    fewer shared tokens: each branch's tokens are always exactly its own prompt's."""

    shots_list: tuple[int, ...]
    tokenizer_path: str
    max_length: int
    max_prompt_length: int
    style: PromptStyle

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        tokenizer = load_tokenizer(self.tokenizer_path)
        out: dict[str, list] = {}
        episodes = [Episode.from_row({key: batch[key][i] for key in batch}) for i in range(len(batch["episode_id"]))]
        for shot_set in shot_sets(episodes):
            by_k = {k: fit_shot_set([e.first_shots(k) for e in shot_set], tokenizer, max_length=self.max_length,
                                    max_prompt_length=self.max_prompt_length, style=self.style)
                    for k in self.shots_list}  # fmt: skip
            for j, episode in enumerate(shot_set):
                fitted = {k: by_k[k][j] for k in self.shots_list}
                fits = [k for k in self.shots_list if fitted[k] is not None]
                prompts = {k: fitted[k].tokens["prompt_ids"] for k in fits}
                longest = max(fits, key=lambda k: len(prompts[k]), default=None)
                cuts = {k: len(os.path.commonprefix([prompts[k], prompts[longest]])) for k in fits}  # on lists
                row = {
                    "user_id": episode.user_id,
                    "episode_id": episode.episode_id,
                    "ks": list(self.shots_list),
                    "fits": [k in prompts for k in self.shots_list],
                    "shots_used": [k - fitted[k].shots_dropped if fitted[k] else 0 for k in self.shots_list],
                    "prompt_ids": prompts[longest] if fits else [],
                    SHOTS_LENGTH: fitted[longest].tokens[SHOTS_LENGTH] if fits else 0,
                    # Completions do not depend on the shots: any fitting variant's are every variant's.
                    **{c: fitted[fits[0]].tokens[c] if fits else [] for c in TOKEN_COLUMNS[1:]},
                    "branch_cuts": [cuts[k] for k in fits],
                    "branch_tails": [prompts[k][cuts[k] :] for k in fits],
                }
                for key, value in row.items():
                    out.setdefault(key, []).append(value)
        return out


def draw_order(seed: int, shot_set: str) -> str:
    """A shot set's place in the seeded random order of held-out episodes (taking the first n of it
    samples across users, where sorting by id would take the alphabetically first ones); at one target a
    shot set, the shot set is the episode."""
    return hashlib.sha256(f"{seed}:{shot_set}".encode()).hexdigest()


def held_out_episodes(
    specs: list[str], *, split: str | None, users: list[str] | None, shots: int, seed: int, targets: int = 1
):
    """Held-out episodes with `shots` shots (one pass), `targets` (K) to a shot set, in the seeded random
    order of `draw_order` with each shot set's targets together: the same for every measure."""
    use_task_shuffles()
    pairs = read_pair_dataset(specs, split)
    if users is not None:
        keep = set(users)
        pairs = pairs.filter(lambda row: row["user_id"] in keep)
    episodes = build_episode_dataset(pairs, shots, passes=1, seed=seed, num_partitions=4, targets=targets)
    drawn = episodes.map(lambda row: {**row, "draw": draw_order(seed, row["shot_set"] or row["episode_id"])})
    return drawn.sort(["draw", "episode_id"]).drop_columns(["draw"]).materialize()


def score_shots(
    episodes,
    *,
    shots_list: list[int],
    policy_path: str,
    reference_path: str,
    max_length: int,
    max_prompt_length: int,
    style: PromptStyle,
    batch_size: int = 8,
    targets: int = 1,
    concurrency: int = 1,
    use_gpu: bool = False,
    more_models: dict[str, str] | None = None,
) -> tuple[list[dict], int]:
    """Per-(episode, k) log-probs of `episodes` (built with max(shots_list) shots, k-shot prompts with their
    first k) under the policy, the reference and `more_models` ({name: path}: columns `{name}_chosen`,
    `{name}_rejected`), and the number of (episode, k) that did not fit. `targets`: the episodes per shot set
    (consecutive in `episodes`); batches hold whole shot sets, so that each one's targets share a row."""
    batch_size = targets * math.ceil(batch_size / targets)
    variants = episodes.map_batches(
        ShotsVariants(tuple(shots_list), policy_path, max_length, max_prompt_length, style),
        batch_size=targets * math.ceil(16 / targets),
    ).materialize()
    # Materialized first, and nothing after the scorers: they may take every CPU, and then no task could run.
    fitting = variants.filter(lambda row: any(row["fits"])).materialize()
    n_fitting = fitting.count()
    # A block a batch: each replica task then ends with its batch, so the bar and Ray Data's no-progress watchdog
    # (30 min) see every batch. As one block, 320 full 8-shot SmolLM2 variants were one task the watchdog stopped.
    fitting = fitting.repartition(max(1, math.ceil(n_fitting / batch_size))).materialize()
    skipped = sum(len(row["fits"]) - sum(row["fits"]) for row in variants.select_columns(["fits"]).take_all())
    scored = fitting.map_batches(
        CompletionScorer,
        fn_constructor_kwargs={"models": {"policy": policy_path, "reference": reference_path, **(more_models or {})}},
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=replica_cpus(concurrency, use_gpu),
        num_gpus=1 if use_gpu else 0,
        scheduling_strategy="SPREAD",  # replicas on every node that has room, not packed onto the first
    )
    names = ["policy", "reference", *(more_models or {})]
    rows = []
    for row in streamed_rows(scored, n_fitting, "scoring held-out episodes", unit="episode"):
        ks = [k for k, fits in zip(row["ks"], row["fits"]) if fits]
        used = [u for u, fits in zip(row["shots_used"], row["fits"]) if fits]
        for b, k in enumerate(ks):
            rows.append({"k": int(k), "user_id": row["user_id"], "episode_id": row["episode_id"],
                         "shots_used": int(used[b]),
                         **{f"{name}_{side}": float(row[f"{name}_{side}"][b]) for name in names
                            for side in ("chosen", "rejected")}})  # fmt: skip
    return rows, int(skipped)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def accuracy_by_shots(rows: list[dict], beta: float) -> list[dict]:
    """Per k: accuracy (share of r_w > r_l) with its Wilson interval, mean margin with a normal one, and
    the shots actually in the prompts (a long episode may lose shots to the length limit)."""
    by_k: dict[int, list[float]] = {}
    used: dict[int, list[int]] = {}
    for row in rows:
        margin = beta * (
            (row["policy_chosen"] - row["reference_chosen"]) - (row["policy_rejected"] - row["reference_rejected"])
        )
        by_k.setdefault(int(row["k"]), []).append(margin)
        used.setdefault(int(row["k"]), []).append(int(row["shots_used"]))
    table = []
    for k in sorted(by_k):
        margins = by_k[k]
        n, wins = len(margins), sum(m > 0 for m in margins)
        mean = sum(margins) / n
        sd = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1)) if n > 1 else 0.0
        low, high = wilson_interval(wins, n)
        table.append({"k": k, "n": n, "accuracy": wins / n, "accuracy_ci": [low, high], "margin": mean,
                      "margin_ci": [mean - 1.96 * sd / math.sqrt(n), mean + 1.96 * sd / math.sqrt(n)],
                      "shots_used_mean": sum(used[k]) / n,
                      "episodes_that_lost_shots": sum(u < k for u in used[k])})  # fmt: skip
    return table


def bayes_optimal_by_shots(
    episodes: list[Episode], shots_list: list[int], users: dict, preferred_only: bool, right: dict | None = None
) -> list[dict]:
    """Per k: the accuracy of an ideal reader of the same first k shots (seeing what the model's prompt
    shows) on the same query pairs: the ceiling a model of synthetic users can reach. `users` is
    users.json: each user's number of cared properties and label noise. With the model's `right`
    ({(episode_id, k): verdict}, see `verdicts`), also how far the model is below it (`gap_to_ideal`), and
    where users.json marks which users hold a pole combination no training user holds, that gap for each
    side (`model_gap_by_combination`): a model that matches profiles it trained on, not reads each property,
    is below the ideal reader on the novel side only."""
    novel = {e.episode_id: users[e.user_id].get("novel_combination") for e in episodes}
    table = []
    for k in shots_list:
        ideal = {}
        for e in episodes:
            user = users[e.user_id]
            ideal[e.episode_id, k] = bayes_optimal_choice(
                [(s.preferred, s.dispreferred) for s in e.first_shots(k).shots],
                (e.query.preferred, e.query.dispreferred), len(user["preferences"]),
                label_noise=user.get("label_noise", 0.0), preferred_only=preferred_only,
            )  # fmt: skip
        accuracy = sum(ideal.values()) / len(episodes) if episodes else float("nan")
        row = {"k": k, "n": len(episodes), "accuracy": accuracy}
        gap = gap_to_ideal(ideal, right) if right is not None else None
        if gap:
            row["model_gap"] = gap
            sides = {side: gap_to_ideal({key: v for key, v in ideal.items() if novel[key[0]] is is_novel}, right)
                     for side, is_novel in (("trained", False), ("novel", True))}  # fmt: skip
            if all(sides.values()):
                row["model_gap_by_combination"] = sides
        table.append(row)
    return table


def gap_to_ideal(ideal: dict[tuple[str, int], float], right: dict[tuple[str, int], bool]) -> dict | None:
    """The ideal reader's accuracy minus the model's on the (episode, k) both scored, with a 95% interval of
    the paired difference (each episode is its own control, so the interval is far narrower than either
    accuracy's); positive: the model is below the ceiling. None where they share no episode."""
    both = [key for key in ideal if key in right]
    if not both:
        return None
    mean, ci = paired_interval([float(ideal[key]) - float(right[key]) for key in both])
    return {"n": len(both), "gap": mean, "ci": ci}


def verdicts(rows: list[dict], beta: float) -> dict[tuple[str, int], bool]:
    """{(episode_id, k): whether the implicit reward ranks the preferred answer first} for score_shots' rows."""
    right = {}
    for row in rows:
        margin = (row["policy_chosen"] - row["reference_chosen"]) - (row["policy_rejected"] - row["reference_rejected"])
        right[row["episode_id"], int(row["k"])] = beta * margin > 0
    return right


def gain_over_shots(rows: list[dict], beta: float, fewer: int) -> dict | None:
    """Accuracy at the largest k minus accuracy at k = `fewer` on the same episodes, in points, with a 95%
    interval of the paired difference (each episode is its own control); None without both ends. Over 0
    shots it says the model reads shots at all; over 1 it says the model pools several, not recalls one."""
    ks = sorted({int(row["k"]) for row in rows})
    if fewer not in ks or ks[-1] <= fewer:
        return None
    right = verdicts(rows, beta)
    both = [e for e, k in right if k == ks[-1] and (e, fewer) in right]
    mean, ci = paired_interval([100.0 * (right[e, ks[-1]] - right[e, fewer]) for e in both])
    return {"k": ks[-1], "over": fewer, "n": len(both), "points": mean, "ci": ci}


def paired_interval(differences: list[float]) -> tuple[float, list[float]]:
    """The mean of paired differences and its normal 95% interval."""
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) if n > 1 else 0.0
    return mean, [mean - 1.96 * sd / math.sqrt(n), mean + 1.96 * sd / math.sqrt(n)]
