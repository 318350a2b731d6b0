"""The Ray Data pipeline: files → pairs → episodes → fitted token ids → one equal shard per worker.

Runs on the cluster (Ray Data tasks), never in one process's memory: files are read one task each,
episodes come from a group-by over users, tokenization is a parallel map. The result is shuffled by a
seeded hash of each episode's id (a deterministic global shuffle), materialized in Ray's object store,
cut to whole optimizer steps and split into equal, contiguous shards, one per worker. Every rank
therefore runs the same number of steps (collectives cannot hang on uneven shards), and a rank's shard
and its order are the same on every run: resuming at step s skips exactly s steps of its shard,
whether after a crash, a worker restart or a re-run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from fspo_ray.config import InputError
from fspo_ray.data.episodes import (
    Episode,
    build_episode_dataset,
    default_passes,
    episode_dataset_stats,
    shot_sets,
    use_task_shuffles,
)
from fspo_ray.data.readers import read_pair_dataset, skipped_rows
from fspo_ray.data.tokenize import PromptStyle, fit_shot_set, load_tokenizer
from fspo_ray.logprobs import SHOTS_LENGTH, TOKEN_COLUMNS
from fspo_ray.train.reference import ReferenceScoring, score_reference


@dataclass(frozen=True)
class Tokenize:
    """A Ray Data batch UDF: fit and tokenize episodes, the targets of a shot set together (they drop the same
    shots, tokenize.fit_shot_set); the ones that cannot fit are dropped (and counted by the caller, as
    episodes built minus rows kept).

    Each row gets its place in the shuffled order: a seeded hash of its shot set (`order`) picks one of
    `windows` windows, and inside a window shot sets go by length (of their packed row), so that consecutive
    rows, which share a micro-batch, are of about the same length and little of a batch is padding; a shot
    set's targets stay next to each other (`target`), so they share a micro-batch and its packed row.
    `fingerprint` identifies the row's tokens (the key of the reference-score cache)."""

    tokenizer_path: str
    max_length: int
    max_prompt_length: int
    style: PromptStyle
    seed: int
    windows: int

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        tokenizer = load_tokenizer(self.tokenizer_path)
        columns = ("episode_id", "order", "window", "length", "target", "fingerprint", "shots_dropped",
                   SHOTS_LENGTH, *TOKEN_COLUMNS)  # fmt: skip
        out: dict[str, list] = {k: [] for k in columns}
        episodes = [Episode.from_row({k: batch[k][i] for k in batch}) for i in range(len(batch["episode_id"]))]
        for shot_set in shot_sets(episodes):
            fitted = fit_shot_set(shot_set, tokenizer, max_length=self.max_length,
                                  max_prompt_length=self.max_prompt_length, style=self.style)  # fmt: skip
            kept = [(e, f) for e, f in zip(shot_set, fitted) if f is not None]
            if not kept:
                continue
            key = shot_set[0].shot_set or shot_set[0].episode_id
            digest = hashlib.blake2b(f"{self.seed}/{key}".encode(), digest_size=8).digest()
            order = int.from_bytes(digest, "big") >> 1  # a seeded shuffle key, fits an int64
            shared = kept[0][1].tokens[SHOTS_LENGTH]
            length = sum(len(f.tokens[c]) for _, f in kept for c in TOKEN_COLUMNS) - (len(kept) - 1) * shared
            for target, (episode, f) in enumerate(kept):
                out["episode_id"].append(episode.episode_id)
                out["order"].append(order)
                out["window"].append(order % self.windows)
                out["length"].append(length)
                out["target"].append(target)
                out["fingerprint"].append(token_fingerprint(*(f.tokens[c] for c in TOKEN_COLUMNS)))
                out["shots_dropped"].append(f.shots_dropped)
                for column in (SHOTS_LENGTH, *TOKEN_COLUMNS):
                    out[column].append(f.tokens[column])
        return out


def token_fingerprint(*sequences: list[int]) -> int:
    text = "|".join(",".join(map(str, seq)) for seq in sequences)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


@dataclass
class PreparedData:
    rows: Any  # a materialized Ray Dataset, in the deterministic order
    examples: int  # its rows
    stats: dict[str, int] = field(default_factory=dict)

    def shards(self, num_workers: int) -> list[Any]:
        """One Ray Dataset per worker, equal and contiguous: rank r's rows and their order are fixed."""
        return self.rows.split(num_workers, equal=True)


def prepare(
    specs: list[str],
    *,
    split: str | None,
    shots: int,
    passes: int | None,
    purpose: str,
    tokenizer_path: str,
    max_length: int,
    max_prompt_length: int,
    style: PromptStyle,
    seed: int,
    rows_per_step: int,
    limit: int | None = None,
    length_window: int = 0,
    targets: int = 1,
    min_shots: int | None = None,
    fitted_cache: dict | None = None,
) -> PreparedData:
    """Episodes of `specs`, fitted and tokenized: a multiple of `rows_per_step` rows, in a fixed order;
    `targets` (K) episodes per shot set (episodes.py), next to each other; each shot set of `min_shots`..`shots`
    shots where min_shots is set.

    `limit` caps the rows (n_examples, n_eval_examples): the first rows of the shuffled order are kept; rows
    beyond it or past the last whole step are left out and counted.
    `length_window` > 1 orders rows by length inside seeded windows of about that many rows (see Tokenize).
    `fitted_cache`, a dict the caller keeps, holds the fitted episodes for the next call on the same files with
    the same settings, whatever its `limit` and `rows_per_step`: a run's SFT and IPO stages (jobs.demo) read,
    build and tokenize them once. The files must not change in between.
    """
    import ray.data

    use_task_shuffles()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # they flood the job's log from every worker; we print summaries
    context.execution_options.preserve_order = True  # a rank's shard must hold the same rows in the same order
    passes = passes if passes is not None else default_passes(shots, purpose, targets)
    key = (tuple(specs), split, shots, passes, tokenizer_path, max_length, max_prompt_length, style, seed,
           length_window, targets, min_shots)  # fmt: skip
    if fitted_cache is not None and key in fitted_cache:
        fitted, stats = fitted_cache[key]
    else:
        fitted, stats = _fit(specs, *key[1:])  # the key is _fit's arguments
        if fitted_cache is not None:
            fitted_cache[key] = fitted, stats
    kept = fitted.count()
    usable = min(kept, limit) if limit is not None else kept
    usable -= usable % rows_per_step
    if usable == 0:
        raise InputError(
            f"{', '.join(specs)}: {kept} episodes fit the length limits, fewer than one step's {rows_per_step}"
        )
    fitted = fitted.limit(usable).materialize()
    return PreparedData(
        rows=fitted,
        examples=usable,
        stats={
            **stats,
            "episodes_skipped_for_length": stats["episodes"] - kept,
            "shots_dropped_for_length": int(fitted.sum("shots_dropped") or 0),
            "episodes_left_out": kept - usable,  # past n_examples / n_eval_examples, or short of a whole step
        },
    )


def _fit(specs, split, shots, passes, tokenizer_path, max_length, max_prompt_length, style, seed, length_window,
         targets, min_shots):  # fmt: skip
    """(the fitted episodes of `specs` in their fixed order, materialized; their counts before any limit)."""
    import ray

    pairs = read_pair_dataset(specs, split).materialize()
    stats = episode_dataset_stats(pairs, shots, passes, seed, targets, min_shots)
    if stats.episodes == 0:
        fewest = min_shots if min_shots is not None else shots
        width = fewest + (targets if shots else 1)
        raise InputError(f"{', '.join(specs)}: no episodes ({stats.users} users, none with {width} pairs)")
    partitions = max(2, min(32, int(ray.cluster_resources().get("CPU", 1))))  # one tokenizing task per CPU
    episodes = build_episode_dataset(pairs, shots, passes, seed, num_partitions=partitions, targets=targets,
                                     min_shots=min_shots)
    windows = max(1, stats.episodes // length_window) if length_window > 1 else 1
    tokenize = Tokenize(tokenizer_path, max_length, max_prompt_length, style, seed, windows)
    # Batches of whole shot sets: the episodes come K at a time per user, so a multiple of K never cuts one.
    fitted = episodes.map_batches(tokenize, batch_size=targets * max(1, 64 // targets))
    fitted = fitted.sort(["window", "length", "order", "target"] if windows > 1 else ["order", "target"])
    stats = {
        "users": stats.users,
        "users_without_episode": stats.users_without_episode,
        "pairs_in_no_episode": stats.pairs_in_no_episode,
        "episodes": stats.episodes,
        "shots": shots,
        "min_shots": min_shots,
        "targets_per_prompt": targets,
        "passes": passes,
        "rows_skipped": skipped_rows(specs, split),  # rows that hold no preference (a vote log's "I'm not sure")
    }
    return fitted.materialize(), stats


def add_reference(sets: list[PreparedData], reference: ReferenceScoring) -> int:
    """Add the reference's log-probs to every row of `sets` (a run's training and held-out rows) in one pass
    (reference.py), in place and in order; return how many rows were scored (0: all came from the cache)."""
    scored, count = score_reference([s.rows for s in sets], reference)
    for prepared, rows in zip(sets, scored):
        prepared.rows = rows.materialize()
    return count
