"""What a skeptic compares a personalized model with: baselines on the same target pairs, at every k.

Each system gives every (held-out episode, k) a score, > 0 when it ranks the person's preferred answer first,
< 0 when it ranks the other first and 0 when it cannot tell (counted as half right). The first k shots of the
episode are what a system may read, as the model reads them:

- `few_shot_base`: the base model's log-likelihood of each answer after the same k-shot prompt (no training);
- `base_implicit_reward`: the same at 0 shots, the base model's own preference (flat over k);
- `population_model`: the same training recipe run with 0 shots (Pref-FT, one model for everyone): its implicit
  reward at 0 shots, against its own reference (flat over k);
- `popularity`: the answer's win rate among the population's voters (smoothed: (wins + 1) / (votes + 2));
- `longer_answer`: the longer answer, in characters;
- `text_model`: frozen sentence embeddings from the base model (mean of its last hidden states over the
  answer's tokens) and a logistic regression on the population's votes, then updated per person from their k
  shots: the weights that best explain those k votes while staying near the population's (an L2 pull of
  `person_l2` toward them; LoRe/PAL-style personalization of a shared reward).

The population (for popularity and the text model) is data the evaluated people are not in: `population=`
votes, else the evaluated people split in two folds by a hash of their id, each fitted on the other.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fspo_ray.data.episodes import Episode
from fspo_ray.data.readers import PreferencePair
from fspo_ray.evaluate.accuracy import paired_interval, wilson_interval
from fspo_ray.models import load_for_inference, padding_id
from fspo_ray.scheduling import replica_cpus

SCORED = ("few_shot_base", "base_implicit_reward", "population_model")  # from log-probs of the episodes
COUNTED = ("popularity", "longer_answer", "text_model")  # from the answers' text and the population's votes
ACCURACY_BASELINES = SCORED + COUNTED


def reward_margin(row: dict, policy: str, reference: str | None = None) -> float:
    """log π(preferred) − log π(rejected), minus the same under `reference`: the implicit reward's margin / β."""
    margin = row[f"{policy}_chosen"] - row[f"{policy}_rejected"]
    return margin - (row[f"{reference}_chosen"] - row[f"{reference}_rejected"]) if reference else margin


def credit(score: float) -> float:
    """1 for the person's answer ranked first, 0 for the other, ½ for a tie (a coin would get it half the time)."""
    return 1.0 if score > 0 else 0.0 if score < 0 else 0.5


class AnswerEmbedder:
    """A Ray Data batch-inference actor: each `text` row's sentence embedding, the mean of the model's last
    hidden states over the text's tokens (no special tokens, as prompts are tokenized)."""

    def __init__(self, model_path: str):
        self.model, self.tokenizer, self.device = load_for_inference(model_path, attention="sdpa")
        self.pad_id = padding_id(self.tokenizer)

    def __call__(self, batch: dict) -> dict:
        ids = [self.tokenizer(str(t), add_special_tokens=False)["input_ids"] or [self.pad_id] for t in batch["text"]]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [self.pad_id] * (width - len(i)) for i in ids], device=self.device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=self.device)
        with torch.no_grad():
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return {"text": list(batch["text"]), "embedding": list(pooled.cpu().numpy())}


def embed_texts(texts: Sequence[str], model_path: str, use_gpu: bool, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{text: embedding} from Ray Data batch inference, shortest texts batched together."""
    import ray.data

    unique = sorted(set(texts), key=len)
    rows = ray.data.from_items([{"text": t} for t in unique]).materialize()  # nothing upstream of the replica
    embedded = rows.map_batches(AnswerEmbedder, fn_constructor_args=(model_path,), batch_size=batch_size, concurrency=1,
                                num_cpus=replica_cpus(1, use_gpu), num_gpus=1 if use_gpu else 0)  # fmt: skip
    return {row["text"]: torch.as_tensor(row["embedding"]) for row in embedded.iter_rows()}


def fit_logistic(differences: torch.Tensor, prior: torch.Tensor, l2: float, steps: int = 25) -> torch.Tensor:
    """argmin_w Σ log(1 + exp(−w·d)) + (l2 / 2)·‖w − prior‖², each row d = x(preferred) − x(dispreferred), by
    Newton's method (the objective is strictly convex for l2 > 0)."""
    w = prior.clone().double()
    d, prior = differences.double(), prior.double()
    for _ in range(steps):
        p = torch.sigmoid(d @ w)  # the chance the model gives each recorded vote
        gradient = -d.T @ (1 - p) + l2 * (w - prior)
        hessian = d.T @ (d * (p * (1 - p)).unsqueeze(1)) + l2 * torch.eye(len(w), dtype=w.dtype)
        step = torch.linalg.solve(hessian, gradient)
        w = w - step
        if step.abs().max() < 1e-8:
            break
    return w.float()


@dataclass
class Population:
    """What the population's votes say: each answer's wins and votes, and the text model's shared weights."""

    wins: dict[tuple[str, str], int]
    votes: dict[tuple[str, str], int]
    weights: torch.Tensor | None = None

    def popularity(self, question: str, answer: str) -> float:
        return (self.wins.get((question, answer), 0) + 1) / (self.votes.get((question, answer), 0) + 2)


def fit_population(pairs: Sequence[PreferencePair], features: dict[str, torch.Tensor] | None, l2: float) -> Population:
    wins, votes = {}, {}
    for p in pairs:
        for answer, won in ((p.preferred, 1), (p.dispreferred, 0)):
            key = (p.question, answer)
            wins[key], votes[key] = wins.get(key, 0) + won, votes.get(key, 0) + 1
    weights = None
    if features is not None:
        d = torch.stack([features[p.preferred] - features[p.dispreferred] for p in pairs])
        weights = fit_logistic(d, torch.zeros(d.shape[1]), l2)
    return Population(wins, votes, weights)


def fold_of(user_id: str | None) -> int:
    return hashlib.sha256(str(user_id).encode()).digest()[0] % 2


def counted_scores(
    episodes: Sequence[Episode],
    shots_list: Sequence[int],
    populations: dict[int, Population],
    features: dict[str, torch.Tensor] | None,
    person_l2: float,
) -> dict[str, dict[tuple[str, int], float]]:
    """{system: {(episode_id, k): score}} of popularity, the longer answer and (with features) the text model.
    `populations` maps a person's fold to the population fitted without them (one entry, -1, for all)."""
    scores: dict[str, dict[tuple[str, int], float]] = {name: {} for name in COUNTED if name != "text_model"}
    if features is not None:
        scores["text_model"] = {}
    for e in episodes:
        population = populations.get(-1) or populations[fold_of(e.user_id)]
        q = e.query
        popular = population.popularity(q.question, q.preferred) - population.popularity(q.question, q.dispreferred)
        longer = len(q.preferred) - len(q.dispreferred)
        target = features[q.preferred] - features[q.dispreferred] if features is not None else None
        for k in shots_list:
            scores["popularity"][e.episode_id, k] = popular
            scores["longer_answer"][e.episode_id, k] = longer
            if target is not None:
                shots = e.first_shots(k).shots
                weights = population.weights
                if shots:  # the person's own votes pull the shared weights toward them
                    d = torch.stack([features[s.preferred] - features[s.dispreferred] for s in shots])
                    weights = fit_logistic(d, population.weights, person_l2)
                scores["text_model"][e.episode_id, k] = float(target @ weights)
    return scores


def standardized(embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each dimension centred and scaled over all texts, so one L2 strength suits every dimension."""
    stacked = torch.stack(list(embeddings.values()))
    mean, std = stacked.mean(0), stacked.std(0).clamp_min(1e-6)
    return {text: (e - mean) / std for text, e in embeddings.items()}


def scored_scores(rows: list[dict], population_rows: list[dict] | None) -> dict[str, dict[tuple[str, int], float]]:
    """{system: {(episode_id, k): score}} of the systems read from log-probs: the model (`fspo`) and the base
    model at every k; the base model's and the population model's 0-shot scores repeated at every k."""
    fspo = {(r["episode_id"], int(r["k"])): reward_margin(r, "policy", "reference") for r in rows}
    scores = {"fspo": fspo}
    if rows and "base_chosen" in rows[0]:
        scores["few_shot_base"] = {(r["episode_id"], int(r["k"])): reward_margin(r, "base") for r in rows}
        at_zero = {e: s for (e, k), s in scores["few_shot_base"].items() if k == 0}
        scores["base_implicit_reward"] = {key: at_zero[key[0]] for key in fspo if key[0] in at_zero}
    if population_rows is not None:
        at_zero = {r["episode_id"]: reward_margin(r, "policy", "reference") for r in population_rows}
        scores["population_model"] = {key: at_zero[key[0]] for key in fspo if key[0] in at_zero}
    return scores


def accuracy_table(scores: dict[tuple[str, int], float], targets: set[tuple[str, int]]) -> list[dict[str, Any]]:
    """Per k, on the `targets` (episode, k) alone: accuracy with its 95% interval, and the gain over k = 0 in
    points with the 95% interval of the paired difference (each target pair its own control)."""
    ks = sorted({k for _, k in targets})
    right = {key: credit(scores[key]) for key in targets}
    table = []
    for k in ks:
        at_k = [e for e, kk in targets if kk == k]
        n = len(at_k)
        accuracy = sum(right[e, k] for e in at_k) / n
        low, high = wilson_interval(accuracy * n, n)
        row = {"k": k, "n": n, "accuracy": accuracy, "accuracy_ci": [low, high]}
        paired = [100.0 * (right[e, k] - right[e, 0]) for e in at_k if (e, 0) in right]
        if k and paired:
            mean, ci = paired_interval(paired)
            row["gain_over_0"] = {"points": mean, "ci": ci, "n": len(paired)}
        table.append(row)
    return table


def head_to_head(scores: dict, opponent: dict, targets: set[tuple[str, int]], k: int) -> dict[str, Any]:
    """The person's own vote as the judge: on each target pair at k shots, a win when the system ranks the
    person's answer first and the opponent does not, a loss the other way round; agreements are ties."""
    wins = losses = ties = 0
    for key in (t for t in targets if t[1] == k):
        mine, theirs = credit(scores[key]), credit(opponent[key])
        wins, losses, ties = wins + (mine > theirs), losses + (mine < theirs), ties + (mine == theirs)
    low, high = wilson_interval(wins, wins + losses)
    rate = wins / (wins + losses) if wins + losses else math.nan
    return {"k": k, "win_rate": rate, "ci": [low, high], "wins": wins, "losses": losses, "ties": ties}


@dataclass(frozen=True)
class TextModelSettings:
    population_l2: float  # L2 strength of the population's logistic regression
    person_l2: float  # pull of a person's weights toward the population's


def compare_systems(
    episodes: Sequence[Episode],
    rows: list[dict],
    shots_list: list[int],
    wanted: Sequence[str],
    *,
    base: str,
    population_rows: list[dict] | None,
    population_pairs: dict[int, list[PreferencePair]],
    text_model: TextModelSettings,
    use_gpu: bool,
) -> tuple[dict[str, list[dict]], dict[str, dict], set[tuple[str, int]]]:
    """({system: accuracy table}, {system: scores}, the targets) for the model (`fspo`) and the `wanted`
    baselines, on the episodes the model was scored on at every k (so every k compares the same pairs).
    `population_pairs` maps a person's fold to the votes fitted for them (-1: one population for all)."""
    per_episode: dict[str, set[int]] = {}
    for r in rows:
        per_episode.setdefault(r["episode_id"], set()).add(int(r["k"]))
    complete = {e for e, ks in per_episode.items() if ks == set(shots_list)}
    targets = {(e, k) for e in complete for k in shots_list}
    scores = scored_scores(rows, population_rows)
    if {"popularity", "longer_answer", "text_model"} & set(wanted):
        features = None
        if "text_model" in wanted:
            texts = [t for pairs in population_pairs.values() for p in pairs for t in (p.preferred, p.dispreferred)]
            texts += [t for e in episodes for s in (*e.shots, e.query) for t in (s.preferred, s.dispreferred)]
            features = standardized(embed_texts(texts, base, use_gpu))
        populations = {fold: fit_population(pairs, features, text_model.population_l2)
                       for fold, pairs in population_pairs.items()}  # fmt: skip
        scores.update(counted_scores([e for e in episodes if e.episode_id in complete], shots_list, populations,
                                     features, text_model.person_l2))  # fmt: skip
    tables = {name: accuracy_table(scores[name], targets) for name in ("fspo", *wanted) if name in scores}
    return tables, scores, targets


def changed_by_shots(episodes: Sequence[Episode], scores: dict, k: int, n: int = 5) -> list[dict[str, Any]]:
    """Up to `n` people whose vote the model predicts differently with k of their shots than with none: the
    shots it read, the pair, the person's vote and the model's pick at 0 and at k shots."""
    changed = []
    for e in episodes:
        if (e.episode_id, k) not in scores or credit(scores[e.episode_id, 0]) == credit(scores[e.episode_id, k]):
            continue
        pick = {s: "preferred" if scores[e.episode_id, s] > 0 else "dispreferred" for s in (0, k)}
        changed.append({"user_id": e.user_id, "shots": [vars(s) for s in e.first_shots(k).shots],
                        "question": e.query.question, "their_vote": e.query.preferred,
                        "the_other_answer": e.query.dispreferred, "model_at_0_shots": pick[0],
                        f"model_at_{k}_shots": pick[k]})  # fmt: skip
        if len(changed) == n:
            break
    return changed
