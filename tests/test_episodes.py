"""Episode invariants (fspo-method.md §1.2), on plain lists and on Ray Data."""

from collections import Counter

import pytest

from fspo_ray.data.episodes import build_episode_dataset, build_episodes, default_passes, episode_dataset_stats
from fspo_ray.data.readers import DataError, PreferencePair


def make_pairs(counts: dict[str, int]) -> list[PreferencePair]:
    pairs, order = [], 0
    for user, n in counts.items():
        for k in range(n):
            pairs.append(PreferencePair(user, f"{user} q{k}", f"{user} w{k}", f"{user} l{k}", f"{user} likes",
                                        order=order, source=f"f row {order + 1}"))  # fmt: skip
            order += 1
    return pairs


COUNTS = {"alice": 13, "bob": 9, "carol": 3, "dave": 1}


def test_every_episode_is_one_user_with_the_query_outside_its_shots():
    episodes, _ = build_episodes(make_pairs(COUNTS), shots=3, passes=2, seed=0)
    for e in episodes:
        assert len(e.shots) == 3
        texts = [s.question for s in e.shots] + [e.query.question]
        assert {t.split()[0] for t in texts} == {e.user_id}
        assert len(set(texts)) == 4  # the query pair is not among the shots, no pair twice
        assert e.user_description == f"{e.user_id} likes"


def test_windows_are_n_plus_one_with_tails_dropped_per_pass():
    episodes, stats = build_episodes(make_pairs(COUNTS), shots=3, passes=5, seed=0)
    assert Counter(e.user_id for e in episodes) == {"alice": 13 // 4 * 5, "bob": 9 // 4 * 5}
    assert (stats.users, stats.episodes, stats.users_without_episode) == (4, len(episodes), 2)


def test_each_pass_uses_disjoint_windows_and_passes_differ():
    episodes, _ = build_episodes(make_pairs({"alice": 12}), shots=2, passes=3, seed=0)
    passes = [episodes[i * 4 : (i + 1) * 4] for i in range(3)]
    for p in passes:
        used = [q for e in p for q in [s.question for s in e.shots] + [e.query.question]]
        assert sorted(used) == sorted(f"alice q{k}" for k in range(12))  # a partition of the user's pairs
    assert passes[0] != passes[1] and passes[1] != passes[2]


def test_pairs_in_no_episode_are_counted():
    episodes, stats = build_episodes(make_pairs({"alice": 7}), shots=2, passes=1, seed=0)
    used = {q for e in episodes for q in [s.question for s in e.shots] + [e.query.question]}
    assert stats.pairs_in_no_episode == 7 - len(used) == 1


def test_deterministic_from_the_seed_and_independent_of_input_order():
    pairs = make_pairs(COUNTS)
    first, _ = build_episodes(pairs, shots=2, passes=2, seed=7)
    again, _ = build_episodes(list(reversed(pairs)), shots=2, passes=2, seed=7)
    other, _ = build_episodes(pairs, shots=2, passes=2, seed=8)
    assert sorted(map(repr, first)) == sorted(map(repr, again))
    assert sorted(map(repr, first)) != sorted(map(repr, other))


def test_default_passes():
    assert default_passes(8) == 18 and default_passes(8, "test") == 1 and default_passes(0) == 1
    assert default_passes(8, targets=4) == 6  # each pair a target about twice: 6 passes x 4 of every 12 pairs
    assert default_passes(3, targets=4) == 4 and default_passes(8, "test", targets=4) == 1


def test_a_window_holds_n_shots_and_k_targets_that_share_them():
    episodes, stats = build_episodes(make_pairs({"alice": 13, "bob": 6}), shots=3, passes=2, seed=0, targets=2)
    by_set = {}
    for e in episodes:
        by_set.setdefault(e.shot_set, []).append(e)
    assert stats.episodes == len(episodes) == 2 * 2 * (13 // 5 + 6 // 5)  # passes x K x windows of N+K
    assert all(len(targets) == 2 for targets in by_set.values())
    for shot_set, (first, second) in by_set.items():
        assert first.shots == second.shots and len(first.shots) == 3 and first.user_id == second.user_id
        window = [s.question for s in first.shots] + [first.query.question, second.query.question]
        assert len(set(window)) == 5  # N + K distinct pairs of one user
        assert (first.episode_id, second.episode_id) == (f"{shot_set}/0", f"{shot_set}/1")
    one, _ = build_episodes(make_pairs({"alice": 13}), shots=3, passes=2, seed=0)
    assert all(e.episode_id == e.shot_set for e in one)  # K = 1: today's episodes and ids
    assert [e.episode_id for e in one] == ["alice/0/0", "alice/0/1", "alice/0/2", "alice/1/0", "alice/1/1", "alice/1/2"]
    with pytest.raises(ValueError, match="targets_per_prompt must be >= 1"):
        build_episodes(make_pairs({"alice": 13}), shots=3, passes=1, seed=0, targets=0)


def test_with_min_shots_each_window_draws_its_shot_count_and_passes_stay_partitions():
    pairs = make_pairs({"alice": 40, "bob": 30})
    episodes, stats = build_episodes(pairs, shots=6, passes=3, seed=0, targets=2, min_shots=2)
    by_set: dict[str, list] = {}
    for e in episodes:
        by_set.setdefault(e.shot_set, []).append(e)
    assert all(len(targets) == 2 and targets[0].shots == targets[1].shots for targets in by_set.values())
    assert {len(targets[0].shots) for targets in by_set.values()} == {2, 3, 4, 5, 6}
    used_in_pass: dict[str, list[str]] = {}  # "{user}/{pass}" -> every pair its windows hold
    for shot_set, targets in by_set.items():
        user, p, _ = shot_set.split("/")
        window = [s.question for s in targets[0].shots] + [t.query.question for t in targets]
        assert {q.split()[0] for q in window} == {user}
        used_in_pass.setdefault(f"{user}/{p}", []).extend(window)
    assert sorted(used_in_pass) == [f"{u}/{p}" for u in ("alice", "bob") for p in range(3)]
    assert all(len(used) == len(set(used)) for used in used_in_pass.values())  # a window never reuses a pair
    assert stats.episodes == len(episodes) and stats.pairs_in_no_episode == 0
    # min_shots = shots draws nothing new: the fixed-N windows.
    fixed, _ = build_episodes(pairs, shots=6, passes=3, seed=0, targets=2)
    assert build_episodes(pairs, shots=6, passes=3, seed=0, targets=2, min_shots=6)[0] == fixed
    for bad in (0, 7):
        with pytest.raises(ValueError, match=f"min_shots must be between 1 and shots=6, got {bad}"):
            build_episodes(pairs, shots=6, passes=1, seed=0, min_shots=bad)


def test_user_less_data_needs_zero_shots():
    pairs = [PreferencePair(None, f"q{k}", "w", "l", order=k) for k in range(3)]
    episodes, stats = build_episodes(pairs, shots=0, passes=1, seed=0)
    assert [e.query.question for e in episodes] == ["q0", "q1", "q2"] and stats.episodes == 3
    with pytest.raises(DataError, match="no user ids.*shots=0"):
        build_episodes(pairs, shots=2, passes=1, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("shots, targets, min_shots", [(0, 1, None), (3, 1, None), (3, 2, None), (4, 2, 1)])
def test_ray_data_gives_the_same_episodes_and_stats(local_ray, shots, targets, min_shots):
    pairs = make_pairs(COUNTS)
    windows = dict(shots=shots, passes=2, seed=3, targets=targets, min_shots=min_shots)
    expected, expected_stats = build_episodes(pairs, **windows)
    ds = local_ray.data.from_items([p.as_row() for p in pairs], override_num_blocks=3)
    rows = build_episode_dataset(ds, num_partitions=2, **windows).take_all()
    from fspo_ray.data.episodes import Episode

    assert sorted(repr(Episode.from_row(r)) for r in rows) == sorted(map(repr, expected))
    assert episode_dataset_stats(ds, **windows) == expected_stats


@pytest.mark.slow
def test_pairs_read_as_one_block_are_grouped_by_as_many_tasks_as_partitions(local_ray):
    """One file is read as one block, and a sort-based group-by keeps its input's blocks: without a split,
    every user's episodes (and the tokenizing fused after them) would fall to one task on one CPU."""
    pairs = make_pairs({f"user-{i:02d}": 8 for i in range(12)})
    ds = local_ray.data.from_items([p.as_row() for p in pairs], override_num_blocks=1)
    episodes = build_episode_dataset(ds, shots=3, passes=2, seed=3, num_partitions=3)
    per_block = [len(batch["user_id"]) for batch in episodes.iter_batches(batch_size=None, batch_format="numpy")]
    assert len(per_block) == 3 and min(per_block) > 0, per_block
    users_per_block = [set(batch["user_id"]) for batch in episodes.iter_batches(batch_size=None)]
    assert sum(map(len, users_per_block)) == len(set.union(*users_per_block))  # no user split across tasks
