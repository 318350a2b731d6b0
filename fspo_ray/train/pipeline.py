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

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

from fspo_ray.config import InputError
from fspo_ray.data.episodes import (
    Episode,
    build_episode_dataset,
    default_passes,
    episode_dataset_stats,
)
from fspo_ray.data.readers import read_pairs, resolve_format
from fspo_ray.data.tokenize import PromptStyle, fit_episode

TOKEN_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class Tokenize:
    """A Ray Data batch UDF: fit and tokenize episodes; the ones that cannot fit are dropped (and counted
    by the caller, as episodes built minus rows kept)."""

    tokenizer_path: str
    max_length: int
    max_prompt_length: int
    style: PromptStyle
    seed: int

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        tokenizer = load_tokenizer(self.tokenizer_path)
        out: dict[str, list] = {k: [] for k in ("episode_id", "order", "shots_dropped", *TOKEN_COLUMNS)}
        for i in range(len(batch["episode_id"])):
            episode = Episode.from_row({k: batch[k][i] for k in batch})
            fitted = fit_episode(
                episode,
                tokenizer,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
                style=self.style,
            )
            if fitted is None:
                continue
            digest = hashlib.blake2b(f"{self.seed}/{episode.episode_id}".encode(), digest_size=8).digest()
            out["episode_id"].append(episode.episode_id)
            out["order"].append(int.from_bytes(digest, "big") >> 1)  # a seeded shuffle key, fits an int64
            out["shots_dropped"].append(fitted.shots_dropped)
            for column in TOKEN_COLUMNS:
                out[column].append(fitted.tokens[column])
        return out


@dataclass
class PreparedData:
    shards: list[Any]  # one materialized Ray Dataset per worker, equal length, deterministic order
    examples: int  # rows over all shards
    stats: dict[str, int] = field(default_factory=dict)


def read_pair_dataset(specs: list[str], split: str | None):
    import ray

    def read_file(item: dict) -> Any:
        for pair in read_pairs(item["spec"], split=split, file_index=item["file_index"]):
            yield pair.as_row()

    for spec in specs:
        resolve_format(spec, split)  # fail here, with the reader's message, rather than inside a task
    items = [{"spec": spec, "file_index": i} for i, spec in enumerate(specs)]
    return ray.data.from_items(items, override_num_blocks=len(items)).flat_map(read_file)


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
    num_workers: int,
    rows_per_step: int,
    limit: int | None = None,
) -> PreparedData:
    """Episodes of `specs` as `num_workers` equal shards holding a multiple of `rows_per_step` rows in all.

    `limit` caps the rows (n_eval_examples); rows beyond the last whole step are left out and counted.
    """
    import ray.data
    from ray.data.context import ShuffleStrategy

    # Task-based shuffles: the default hash shuffle starts aggregator actors, slow to start and
    # greedy for CPUs on a small machine; group-by and sort here move little data.
    context = ray.data.DataContext.get_current()
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.enable_progress_bars = False  # they flood the job's log from every worker; we print summaries
    passes = passes if passes is not None else default_passes(shots, purpose)
    pairs = read_pair_dataset(specs, split).materialize()
    stats = episode_dataset_stats(pairs, shots, passes, seed)
    if stats.episodes == 0:
        raise InputError(f"{', '.join(specs)}: no episodes ({stats.users} users, none with {shots + 1} pairs)")
    partitions = max(1, min(32, pairs.num_blocks() * 2))
    episodes = build_episode_dataset(pairs, shots, passes, seed, num_partitions=partitions)
    tokenize = Tokenize(tokenizer_path, max_length, max_prompt_length, style, seed)
    fitted = episodes.map_batches(tokenize, batch_size=64).sort("order").materialize()
    kept = fitted.count()
    usable = min(kept, limit) if limit is not None else kept
    usable -= usable % rows_per_step
    if usable == 0:
        raise InputError(
            f"{', '.join(specs)}: {kept} episodes fit the length limits, fewer than one step's {rows_per_step}"
        )
    shards = fitted.limit(usable).split(num_workers, equal=True)
    return PreparedData(
        shards=shards,
        examples=usable,
        stats={
            "users": stats.users,
            "users_without_episode": stats.users_without_episode,
            "pairs_in_no_episode": stats.pairs_in_no_episode,
            "episodes": stats.episodes,
            "episodes_skipped_for_length": stats.episodes - kept,
            "shots_dropped_for_length": int(fitted.sum("shots_dropped") or 0) if kept else 0,
            "episodes_left_out": kept - usable,  # past n_eval_examples, or short of a whole step
            "shots": shots,
            "passes": passes,
        },
    )
