"""FSPO episodes: N shots of one user in context plus one more pair of the same user as the query.

Per user (fspo-method.md §1.2): order the user's pairs as they appear in the data, shuffle them with a
generator seeded by (seed, user, pass), and cut non-overlapping windows of **N+K** pairs: pairs 0..N-1
are the shots, pairs N..N+K-1 are K queries ("targets") that share those shots. Each target is an
ordinary episode (its shots, its query pair); the K of one window carry the window's id as `shot_set`, and
training and evaluation compute their shared shots once (logprobs.py). K = `targets`, 1 by default: windows
of N+1, today's episodes. With `min_shots` M, each window draws its own N from M..N (the same generator,
after the shuffle), so training also shows the shorter histories a user brings before they have N pairs.
(The reference cuts N+2 and never uses the last pair, an off-by-one we do not copy.) The tail that does not
fill a window is left out of that pass; R passes with fresh shuffles put each pair in many contexts, so few
pairs end up in no episode at all, and those are counted. Shuffles depend only on the seed, the user id and
the user's pair count, never on how the data is partitioned, so Ray Data and plain lists give the same
episodes. At 0 shots there is nothing to share: K is taken as 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fspo_ray.data.prompts import Shot
from fspo_ray.data.readers import DataError, PreferencePair


@dataclass(frozen=True)
class Episode:
    user_id: str | None
    shots: tuple[Shot, ...]  # oldest first: the order they appear in the prompt
    query: Shot
    user_description: str | None = None
    dispreferred_description: str | None = None  # of the persona the query's dispreferred answer suits
    query_source: str = ""
    episode_id: str = ""  # "{user}/{pass}/{window}" ("/{target}" added when K > 1; "{source}/{pass}" at 0 shots)
    shot_set: str = ""  # "{user}/{pass}/{window}": the episodes with the same shots, the same window

    def first_shots(self, k: int) -> Episode:
        """The episode with only its first k shots: evaluation's k-shot variant (each k's prompt then begins
        with the last one's, so one forward reads the shots for every k)."""
        return dataclasses.replace(self, shots=self.shots[:k])

    def as_row(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "shots": [vars(s) for s in self.shots],
            "query": vars(self.query),
            "user_description": self.user_description,
            "dispreferred_description": self.dispreferred_description,
            "query_source": self.query_source,
            "episode_id": self.episode_id,
            "shot_set": self.shot_set,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Episode:
        return cls(
            user_id=row["user_id"],
            shots=tuple(Shot(**s) for s in row["shots"]),
            query=Shot(**row["query"]),
            user_description=_plain(row.get("user_description")),
            dispreferred_description=_plain(row.get("dispreferred_description")),
            query_source=row.get("query_source", ""),
            episode_id=row.get("episode_id", ""),
            shot_set=row.get("shot_set", ""),
        )


@dataclass
class EpisodeStats:
    users: int = 0
    episodes: int = 0
    users_without_episode: int = 0  # fewer than N+K pairs
    pairs_in_no_episode: int = 0  # in the tail of every pass

    def add(self, other: EpisodeStats) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def default_passes(shots: int, split: str = "train", targets: int = 1) -> int:
    """Passes for training: enough that each pair is a target about twice, R = ⌈2(N+K)/K⌉ (2(N+1) at K = 1,
    the reference's); one for evaluation; user-less data (N = 0) needs one."""
    return -(-2 * (shots + targets) // targets) if split == "train" and shots > 0 else 1


def episode_windows(
    user_id: str | None, n_pairs: int, shots: int, passes: int, seed: int, targets: int = 1,
    min_shots: int | None = None,
) -> list[tuple[int, int, list[int]]]:
    """(pass, window number in the pass, indices into the user's pairs in data order) of each window: its shots
    (N, or drawn from `min_shots`..N), then K targets."""
    if targets < 1:
        raise ValueError(f"targets_per_prompt must be >= 1, got {targets}")
    if min_shots is not None and not 1 <= min_shots <= shots:
        raise ValueError(f"min_shots must be between 1 and shots={shots}, got {min_shots}")
    windows = []
    for p in range(passes):
        order, rng = list(range(n_pairs)), random.Random(f"{seed}/{user_id}/{p}")
        rng.shuffle(order)
        start, first = 0, len(windows)
        while True:
            n = rng.randint(min_shots, shots) if min_shots is not None else shots
            width = n + (targets if n else 1)
            if start + width > n_pairs:
                break
            windows.append((p, len(windows) - first, order[start : start + width]))
            start += width
    return windows


def _shots_in(window: list[int], shots: int, targets: int) -> int:
    """How many of a window's pairs are shots: all but its K targets (a 0-shot window is one target)."""
    return len(window) - targets if shots else 0


def _window_stats(
    user_id: str | None, n_pairs: int, shots: int, passes: int, seed: int, targets: int, min_shots: int | None
) -> EpisodeStats:
    windows = episode_windows(user_id, n_pairs, shots, passes, seed, targets, min_shots)
    used = {i for _, _, w in windows for i in w}
    episodes = sum(len(w) - _shots_in(w, shots, targets) for _, _, w in windows)
    return EpisodeStats(
        users=1, episodes=episodes, users_without_episode=int(not windows), pairs_in_no_episode=n_pairs - len(used)
    )


def _check_shots(user_id: str | None, shots: int) -> None:
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if user_id is None and shots > 0:
        raise DataError(
            f"this data has no user ids (DPO-codebase JSON), so it cannot make {shots}-shot episodes; use shots=0"
        )


def user_episodes(
    pairs: Sequence[PreferencePair], shots: int, passes: int, seed: int, targets: int = 1,
    min_shots: int | None = None,
) -> list[Episode]:
    """All episodes of one user's pairs: window by window, the K targets of a window one after another."""
    if not pairs:
        return []
    user_id = pairs[0].user_id
    _check_shots(user_id, shots)
    ordered = sorted(pairs, key=lambda p: p.order)
    if user_id is None:  # no user: every pair stands alone, in data order
        windows = [(p, i, [i]) for p in range(passes) for i in range(len(ordered))]
    else:
        windows = episode_windows(user_id, len(ordered), shots, passes, seed, targets, min_shots)
    episodes = []
    for p, w, window in windows:
        n = _shots_in(window, shots, targets)
        context, queries = [ordered[i] for i in window[:n]], [ordered[i] for i in window[n:]]
        shot_set = f"{user_id}/{p}/{w}"
        for j, query in enumerate(queries):
            if not context:  # a 0-shot episode is its pair: named by the pair, however the pairs were grouped
                episode_id = shot_set = f"{query.source}/{p}"
            else:
                episode_id = f"{shot_set}/{j}" if len(queries) > 1 else shot_set
            episodes.append(
                Episode(
                    user_id=user_id,
                    shots=tuple(Shot(p.question, p.preferred, p.dispreferred) for p in context),
                    query=Shot(query.question, query.preferred, query.dispreferred),
                    user_description=query.user_description,
                    dispreferred_description=query.dispreferred_description,
                    query_source=query.source,
                    episode_id=episode_id,
                    shot_set=shot_set,
                )
            )
    return episodes


def shot_sets(episodes: Iterable[Episode]) -> list[list[Episode]]:
    """Consecutive episodes grouped by their shot set (the targets of one window), in order; an episode
    without a shot set is its own."""
    return [list(group) for _, group in itertools.groupby(episodes, key=lambda e: e.shot_set or id(e))]


def build_episodes(
    pairs: Iterable[PreferencePair], shots: int, passes: int, seed: int, targets: int = 1,
    min_shots: int | None = None,
) -> tuple[list[Episode], EpisodeStats]:
    """Episodes of every user in `pairs` (plain Python, for small data), users in first-seen order;
    `targets` queries per window of shots (K), each window of `min_shots`..`shots` shots where min_shots is set."""
    by_user: dict[str | None, list[PreferencePair]] = defaultdict(list)
    for pair in pairs:
        by_user[pair.user_id].append(pair)
    episodes, stats = [], EpisodeStats()
    for user_id, user_pairs in by_user.items():
        episodes += user_episodes(user_pairs, shots, passes, seed, targets, min_shots)
        if user_id is None:
            stats.add(EpisodeStats(episodes=len(user_pairs) * passes))
        else:
            stats.add(_window_stats(user_id, len(user_pairs), shots, passes, seed, targets, min_shots))
    return episodes, stats


def _plain(value: Any) -> Any:
    """A Python value from a Ray Data cell: numpy scalars unwrapped, an all-null column's NaN as None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def use_task_shuffles() -> None:
    """Run this process's Ray Data group-bys and sorts as tasks. The default hash shuffle starts aggregator
    actors, slow to start and greedy for CPUs on a small machine (6-20 s before an evaluation's first
    episode, measured); the group-bys and sorts here move little data."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def build_episode_dataset(
    pairs_ds, shots: int, passes: int, seed: int, num_partitions: int | None = None, targets: int = 1,
    min_shots: int | None = None,
):
    """The same episodes on a Ray Dataset of `PreferencePair.as_row()` rows: a group-by over users, whose
    output keeps a window's targets together.

    `num_partitions` sets the group-by's width: the blocks it is split into, each grouped (and whatever
    follows fused, such as tokenizing) in its own task. A sort-based group-by keeps its input's blocks, so
    the pairs are split first: one file is one block, and would be tokenized by one task on one CPU.
    """
    if shots == 0:
        # Zero-shot episodes need no grouping; skip the all-to-all shuffle.
        return pairs_ds.flat_map(
            lambda row: [e.as_row() for e in user_episodes([PreferencePair(**row)], 0, passes, seed)]
        )
    columns = list(PreferencePair.__dataclass_fields__)

    def group_episodes(group: dict[str, Any]) -> dict[str, list]:
        n = len(group["question"])
        pairs = [PreferencePair(**{c: _plain(group[c][i]) for c in columns}) for i in range(n)]
        rows = [e.as_row() for e in user_episodes(pairs, shots, passes, seed, targets, min_shots)]
        return {key: [r[key] for r in rows] for key in Episode.__dataclass_fields__} if rows else {}

    if num_partitions:
        pairs_ds = pairs_ds.repartition(num_partitions)
    return pairs_ds.groupby("user_id", num_partitions=num_partitions).map_groups(group_episodes, batch_format="numpy")


def episode_dataset_stats(
    pairs_ds, shots: int, passes: int, seed: int, targets: int = 1, min_shots: int | None = None
) -> EpisodeStats:
    """What `build_episode_dataset` will leave out, from per-user pair counts alone.

    Counts are taken per block and summed here (users × blocks small numbers), which needs no shuffle.
    """

    def count_users(batch: dict[str, Any]) -> dict[str, list]:
        counts = Counter(_plain(u) for u in batch["user_id"])
        return {"user_id": list(counts), "n": list(counts.values())}

    per_user: Counter = Counter()
    for row in pairs_ds.select_columns(["user_id"]).map_batches(count_users, batch_format="numpy").iter_rows():
        per_user[_plain(row["user_id"])] += row["n"]
    stats = EpisodeStats()
    for user_id, n_pairs in per_user.items():
        _check_shots(user_id, shots)
        stats.add(
            _window_stats(user_id, n_pairs, shots, passes, seed, targets, min_shots)
            if user_id is not None
            else EpisodeStats(episodes=n_pairs * passes)
        )
    return stats
