"""Synthetic users (fspo_ray/data/synthetic.py, jobs/synthetic_users.py): what the written data promises.

Expectations come from the module's contract, checked on the files a user gets: the preferred answer
shows the user's poles, every pole is equally common among training users (so no user-agnostic rule
beats chance without shots), held-out users are disjoint and partly hold unseen combinations.
"""

import itertools
import json
from collections import Counter

import pytest

from fspo_ray.data.readers import read_pairs, resolve_format
from fspo_ray.data.episodes import build_episodes
from fspo_ray.data.synthetic import (
    _QUESTIONS,
    _TASKS,
    DIMENSIONS,
    bayes_optimal_choice,
    detect_properties,
    make_users,
    SyntheticUser,
    on_task,
    render_answer,
    score_answer,
    user_pairs,
    write_synthetic,
)
from jobs import synthetic_users

SMALL = dict(n_train_users=20, n_test_users=6, pairs_per_user=10)


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_users(paths):
    with open(paths["users"], encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The data set the job writes with its default sizes (seed 0, no label noise)."""
    paths = synthetic_users.main([f"out={tmp_path_factory.mktemp('synthetic')}"])
    return paths, load_jsonl(paths["train"]), load_jsonl(paths["test"]), load_users(paths)


# --- determinism and files ------------------------------------------------------------------------


def test_same_seed_writes_identical_files_and_another_seed_other_pairs(tmp_path):
    a, b, c = (write_synthetic(str(tmp_path / name), **SMALL, seed=seed) for name, seed in
               (("a", 7), ("b", 7), ("c", 8)))  # fmt: skip
    for name in ("train", "test", "users"):
        with open(a[name], "rb") as fa, open(b[name], "rb") as fb:
            assert fa.read() == fb.read(), name
    rows_a, rows_c = load_jsonl(a["train"]), load_jsonl(c["train"])
    assert len(rows_a) == len(rows_c) == 20 * 10
    same = sum(x == y for x, y in zip(rows_a, rows_c))
    assert same < len(rows_a) / 2  # a different seed draws (mostly) different pairs


def test_default_sizes_write_at_least_ten_thousand_pairs(default_data):
    paths, train, test, _ = default_data
    lines = 0
    for split in ("train", "test"):
        with open(paths[split], encoding="utf-8") as f:
            lines += sum(1 for line in f if line.strip())
    assert lines == len(train) + len(test) >= 10_000


def test_files_read_back_as_canonical_pairs(default_data):
    paths, train, test, _ = default_data
    for split, rows in (("train", train), ("test", test)):
        assert resolve_format(paths[split]) == "canonical"
        pairs = list(read_pairs(paths[split]))
        assert len(pairs) == len(rows)
        for pair, row in zip(pairs, rows):
            got = (pair.user_id, pair.question, pair.preferred, pair.dispreferred, pair.user_description)
            assert got == (row["user_id"], row["question"], row["preferred"], row["dispreferred"],
                           row["user_description"])  # fmt: skip
            assert pair.dispreferred_description == row["dispreferred_description"]


# --- users ----------------------------------------------------------------------------------------


def test_train_and_test_users_are_disjoint_and_some_test_users_hold_unseen_combinations(default_data):
    _, train, test, users = default_data
    train_ids, test_ids = {r["user_id"] for r in train}, {r["user_id"] for r in test}
    assert train_ids and test_ids and not train_ids & test_ids
    assert all(users[u]["split"] == "train" for u in train_ids)
    assert all(users[u]["split"] == "test" for u in test_ids)
    assert set(users) == train_ids | test_ids

    trained = {frozenset(users[u]["preferences"].items()) for u in train_ids}
    novel = [u for u in test_ids if users[u]["novel_combination"]]
    assert len(novel) == len(test_ids) // 2  # half the held-out users (64 of them by default)
    for u in test_ids:
        held_in_training = frozenset(users[u]["preferences"].items()) in trained
        assert held_in_training != users[u]["novel_combination"], u
    # The unseen combinations are made of poles that training users do hold, one by one.
    trained_poles = {item for combo in trained for item in combo}
    assert all(set(users[u]["preferences"].items()) <= trained_poles for u in novel)


def test_without_held_out_combinations_training_users_hold_every_combination_the_held_out_users_hold(tmp_path):
    # 4 properties, 2 of them per user, 2 poles each: 6 x 4 = 24 combinations; 48 training users hold each twice.
    paths = synthetic_users.main([f"out={tmp_path}", "n_train_users=48", "n_test_users=30", "pairs_per_user=1",
                                  "held_out_combinations=false"])  # fmt: skip
    users = load_users(paths)
    profiles = Counter(frozenset(u["preferences"].items()) for u in users.values() if u["split"] == "train")
    assert len(profiles) == 24 and set(profiles.values()) == {2}
    assert all(len(p) == 2 and {d for d, _ in p} <= set(DIMENSIONS) for p in profiles)
    held_out = [u for u in users.values() if u["split"] == "test"]
    assert len(held_out) == 30 and not any(u["novel_combination"] for u in held_out)
    assert {frozenset(u["preferences"].items()) for u in held_out} == set(profiles)
    # The combinations the default world holds out are among the held-out users' too.
    default = load_users(write_synthetic(str(tmp_path / "default"), n_train_users=48, n_test_users=30,
                                         pairs_per_user=1))  # fmt: skip
    unseen = {frozenset(u["preferences"].items()) for u in default.values() if u["novel_combination"]}
    assert len(unseen) == 6 and unseen <= {frozenset(u["preferences"].items()) for u in held_out}


def test_training_users_can_care_about_fewer_properties_than_the_held_out_users(tmp_path):
    # One property a user: 8 combinations (4 properties x 2 poles); two: 24. 96 training users alternate
    # between one and two: the 48 one-property users hold each pole 6 times, the 48 others each pair twice.
    paths = synthetic_users.main([f"out={tmp_path}", "n_train_users=96", "n_test_users=24", "pairs_per_user=2",
                                  "train_dims_per_user=[1,2]", "held_out_combinations=false"])  # fmt: skip
    users = load_users(paths)
    train = [u["preferences"] for _, u in sorted(users.items()) if u["split"] == "train"]
    assert [len(p) for p in train] == [1, 2] * 48
    singles = Counter(frozenset(p.items()) for p in train if len(p) == 1)
    assert len(singles) == 8 and set(singles.values()) == {6}
    pairs = Counter(frozenset(p.items()) for p in train if len(p) == 2)
    assert len(pairs) == 24 and set(pairs.values()) == {2}
    held_out = [u for u in users.values() if u["split"] == "test"]
    assert len(held_out) == 24 and all(len(u["preferences"]) == 2 for u in held_out)
    # Each training user's pairs differ only on the properties that user cares about.
    for row in load_jsonl(paths["train"]):
        cared = users[row["user_id"]]["preferences"]
        won, lost = detect_properties(row["preferred"]), detect_properties(row["dispreferred"])
        assert {d for d in DIMENSIONS if won[d] != lost[d]} <= set(cared), row


@pytest.mark.parametrize("dims_per_user", [1, 2, 3, 4])
def test_each_pole_is_equally_common_among_training_users(tmp_path, dims_per_user):
    def train_prefs(n_train, out):
        users = load_users(write_synthetic(str(out), n_train_users=n_train, n_test_users=0, pairs_per_user=1,
                                           dims_per_user=dims_per_user))  # fmt: skip
        return [u["preferences"] for u in users.values() if u["split"] == "train"]

    # How many distinct profiles training users cycle through, seen from a large population.
    prefs = train_prefs(200, tmp_path / "many")
    assert all(len(p) == dims_per_user for p in prefs)
    n_profiles = len({frozenset(p.items()) for p in prefs})
    for multiple in (1, 3):
        counts = Counter((d, pole) for p in train_prefs(multiple * n_profiles, tmp_path / f"x{multiple}")
                         for d, pole in p.items())  # fmt: skip
        for d, (a, b) in DIMENSIONS.items():
            assert counts[d, a] == counts[d, b] > 0, (d, counts)


# --- the scoring function and the pairs -----------------------------------------------------------


@pytest.mark.parametrize("poles", list(itertools.product(*DIMENSIONS.values())), ids="-".join)
def test_detect_properties_recovers_every_pole_of_a_rendered_answer(poles):
    wanted = dict(zip(DIMENSIONS, poles))
    for (task, steps), opener, closer in itertools.product(_TASKS, range(3), range(3)):
        assert detect_properties(render_answer(task, steps, wanted, opener, closer)) == wanted


def test_every_written_pair_is_ranked_by_the_users_preferences(default_data):
    _, train, test, users = default_data
    for row in train + test:
        prefs = users[row["user_id"]]["preferences"]
        assert score_answer(row["preferred"], prefs) > score_answer(row["dispreferred"], prefs), row
        shown_w, shown_l = detect_properties(row["preferred"]), detect_properties(row["dispreferred"])
        differing = {d for d in DIMENSIONS if shown_w[d] != shown_l[d]}
        # The answers differ on a non-empty subset of the user's properties, the preferred one
        # holding the user's poles there, and agree on everything else.
        assert differing and differing <= set(prefs), row
        assert all(shown_w[d] == prefs[d] for d in differing), row
        assert row["user_description"] == users[row["user_id"]]["description"]


def pole_rule_accuracy(rows, dim, pole):
    """Accuracy of "prefer the answer showing `pole` of `dim`" on the pairs where that rule takes a side."""
    decided = right = 0
    for row in rows:
        won, lost = detect_properties(row["preferred"])[dim], detect_properties(row["dispreferred"])[dim]
        if won != lost:
            decided += 1
            right += won == pole
    return right / decided, decided


@pytest.mark.parametrize("dim,pole", [(d, p) for d, poles in DIMENSIONS.items() for p in poles])
def test_without_shots_the_preferred_answer_cannot_be_guessed(default_data, dim, pole):
    _, train, test, _ = default_data
    # Pooled over training users, the preferred answer shows each pole half the time.
    share, decided = pole_rule_accuracy(train, dim, pole)
    assert decided >= 1000
    assert abs(share - 0.5) <= 0.05
    # So a fixed, user-independent rule is at chance on held-out users too.
    accuracy, decided = pole_rule_accuracy(test, dim, pole)
    assert decided >= 300
    assert 0.45 <= accuracy <= 0.55


def test_the_users_own_preferences_pick_every_held_out_pair(default_data):
    _, _, test, users = default_data
    right = sum(score_answer(r["preferred"], users[r["user_id"]]["preferences"]) >
                score_answer(r["dispreferred"], users[r["user_id"]]["preferences"]) for r in test)  # fmt: skip
    assert right == len(test) > 0


def test_label_noise_flips_about_that_share_of_pairs(tmp_path):
    paths = write_synthetic(str(tmp_path), n_train_users=50, n_test_users=10, pairs_per_user=40, label_noise=0.2)
    users = load_users(paths)
    rows = load_jsonl(paths["train"]) + load_jsonl(paths["test"])
    assert len(rows) >= 2000
    flipped = sum(score_answer(r["preferred"], users[r["user_id"]]["preferences"]) <
                  score_answer(r["dispreferred"], users[r["user_id"]]["preferences"]) for r in rows)  # fmt: skip
    assert 0.15 <= flipped / len(rows) <= 0.25


def test_training_users_can_be_consistent_while_held_out_users_flip_labels(tmp_path):
    paths = write_synthetic(str(tmp_path), n_train_users=50, n_test_users=25, pairs_per_user=40, label_noise=0.2,
                            train_label_noise=0.0)  # fmt: skip
    users = load_users(paths)

    def flipped(split):
        rows = load_jsonl(paths[split])
        return sum(score_answer(r["preferred"], users[r["user_id"]]["preferences"]) <
                   score_answer(r["dispreferred"], users[r["user_id"]]["preferences"]) for r in rows) / len(rows)  # fmt: skip

    assert flipped("train") == 0.0 and 0.15 <= flipped("test") <= 0.25
    # The ideal reader reads each user's own rate from the users file.
    assert {(u["split"], u["label_noise"]) for u in users.values()} == {("train", 0.0), ("test", 0.2)}


def test_a_first_word_that_is_no_opener_shows_no_tone():
    for text in ("I would mix flour and water.", "In short, knead it.", "He says: bake it.", "Of all ways, this."):
        assert detect_properties(text)["tone"] is None, text


# --- content: is an answer on the asked task? -----------------------------------------------------


@pytest.mark.parametrize("task_index", range(len(_TASKS)))
def test_every_rendered_answer_is_on_its_task_and_off_every_other(task_index):
    task, steps = _TASKS[task_index]
    other_task = _TASKS[(task_index + 1) % len(_TASKS)][0]
    for poles, opener, closer in itertools.product(itertools.product(*DIMENSIONS.values()), range(3), range(3)):
        answer = render_answer(task, steps, dict(zip(DIMENSIONS, poles)), opener, closer)
        for template in _QUESTIONS:
            assert on_task(answer, template.format(task=task)), answer
            assert not on_task(answer, template.format(task=other_task)), answer


def test_answers_with_wrong_missing_or_reordered_steps_are_off_task():
    question = "Can you explain how to learn to juggle?"
    # The word salad: the opener and closer of a style, steps of other tasks.
    salad = ("Of course. To learn to stay. Next, pick a budget. Then follow your breath. Finally, pick a budget. "
             "Finally, pick them when red. Enjoy every minute!")  # fmt: skip
    for text in (salad, "", "Certainly. That is all.", "Hey! Toss it at eye level. Proceed with care.",
                 "Indeed. To learn to juggle, start with one ball. Next, add a second ball. Then toss it at eye level. "
                 "Finally, stay relaxed. That is all.",
                 "Yo! To learn to juggle, start with one ball. Next, toss it at eye level. Then add a second ball. "
                 "Enjoy every minute!"):  # fmt: skip
        assert not on_task(text, question), text
    assert on_task("Hey! Start with one ball. Proceed with care.", question)
    assert not on_task("Hey! Start with one ball. Proceed with care.", "How do I knit a scarf?")  # not a task we made


def test_an_off_task_answer_loses_to_any_on_task_one():
    task, steps = _TASKS[0]
    question = f"How do I {task}?"
    user = {"tone": "formal", "length": "brief"}
    worst = render_answer(task, steps, {"tone": "casual", "length": "detailed", "format": "prose", "mood": "reserved"})
    best_style_wrong_task = render_answer(*_TASKS[1], {"tone": "formal", "length": "brief", "format": "prose",
                                                       "mood": "reserved"})  # fmt: skip
    assert score_answer(worst, user, question) == -1.0
    assert score_answer(best_style_wrong_task, user) == 1.0  # style alone would rank it first ...
    assert score_answer(best_style_wrong_task, user, question) < score_answer(worst, user, question)  # ... content does not
    assert score_answer("", user, question) < score_answer(worst, user, question)


# --- the ideal reader ------------------------------------------------------------------------------


def answer(poles: str, task: int = 0) -> str:
    """An answer showing `poles` ("formal brief prose enthusiastic") for task `task`."""
    return render_answer(*_TASKS[task], dict(zip(DIMENSIONS, poles.split())))


def test_one_shot_reveals_a_one_property_user_to_an_ideal_reader():
    formal, casual = answer("formal brief prose enthusiastic"), answer("casual brief prose enthusiastic")
    shot = (answer("formal detailed bullets reserved", 3), answer("casual detailed bullets reserved", 3))
    assert bayes_optimal_choice([], (formal, casual), 1) == 0.5  # no shots: every pole equally likely
    assert bayes_optimal_choice([shot], (formal, casual), 1) == 1.0
    assert bayes_optimal_choice([shot], (casual, formal), 1) == 0.0  # the query's label against the shot's
    # Seeing only the preferred answer is enough: a query differing on tone means the user cares about tone.
    assert bayes_optimal_choice([shot], (formal, casual), 1, preferred_only=True) == 1.0


def test_label_noise_makes_contradicting_shots_a_tie_and_a_majority_win():
    formal, casual = answer("formal brief prose enthusiastic"), answer("casual brief prose enthusiastic")
    for_formal, for_casual = (formal, casual), (casual, formal)
    assert bayes_optimal_choice([for_formal, for_casual], for_formal, 1, label_noise=0.2) == 0.5
    assert bayes_optimal_choice([for_formal, for_casual, for_formal], for_formal, 1, label_noise=0.2) == 1.0
    assert bayes_optimal_choice([for_casual], for_formal, 1, label_noise=0.2) == 0.0


def test_the_ideal_reader_with_the_training_users_prior_infers_a_property_no_shot_shows():
    # Training users who care about tone and format hold only formal with prose, casual with bullets.
    prior = [{"tone": "formal", "format": "prose"}, {"tone": "casual", "format": "bullets"}]
    shot = (answer("formal brief bullets reserved"), answer("casual brief bullets reserved"))  # tone only
    prose, bullets = answer("casual detailed prose enthusiastic"), answer("casual detailed bullets enthusiastic")
    # Every profile alike: a shot about tone says nothing about format.
    assert bayes_optimal_choice([shot], (prose, bullets), 2) == 0.5
    # The training users' prior: formal means prose, whatever the query's own tone.
    assert bayes_optimal_choice([shot], (prose, bullets), 2, profiles=prior) == 1.0
    assert bayes_optimal_choice([shot], (bullets, prose), 2, profiles=prior) == 0.0


def episodes_of(dims_per_user, shots, n_users=24, pairs=12, label_noise=0.0):
    pairs_ = [p for u in make_users(0, n_users, dims_per_user) for p in user_pairs(u, pairs, seed=3, label_noise=label_noise)]
    episodes, _ = build_episodes(pairs_, shots=shots, passes=1, seed=0)
    return episodes


@pytest.mark.parametrize("preferred_only", [False, True])
def test_the_ideal_reader_is_exact_on_one_property_users_from_one_shot(preferred_only):
    # fspo-method.md's synthetic users with one cared property: the query pair differs on that property
    # only and every shot shows the user's pole on it, so any shot settles it; no shot leaves a coin flip.
    episodes = episodes_of(1, 3)
    assert len(episodes) >= 60
    for k, expected in ((0, 0.5), (1, 1.0), (2, 1.0), (3, 1.0)):
        for e in episodes:
            shots = [(s.preferred, s.dispreferred) for s in e.shots[3 - k :]]
            choice = bayes_optimal_choice(shots, (e.query.preferred, e.query.dispreferred), 1,
                                          preferred_only=preferred_only)  # fmt: skip
            assert choice == expected, (k, e.episode_id)


@pytest.mark.parametrize("preferred_only", [False, True])
def test_the_ideal_reader_of_two_property_users_does_at_least_as_well_as_counting_shots(preferred_only):
    """With two cared properties a shot's other poles are noise; the ideal reader must do at least as well
    as counting, on the query's differing properties, the poles the shots' preferred answers show (and,
    seeing whole pairs, only where a shot's answers differ). Users are drawn as the reader assumes: every
    profile equally often."""
    profiles = [u.preferences for u in make_users(0, 48, 2)]
    profiles = [dict(p) for p in sorted({tuple(sorted(p.items())) for p in profiles})]  # a set: sorted, so hash-seed free
    users = [SyntheticUser(f"u{i}", profiles[i % len(profiles)], "test", False) for i in range(10 * len(profiles))]
    pairs = [p for u in users for p in user_pairs(u, 16, seed=5)]
    episodes, _ = build_episodes(pairs, shots=3, passes=1, seed=0)

    def count(e, only_differing_shots):
        won, lost = detect_properties(e.query.preferred), detect_properties(e.query.dispreferred)
        score = 0
        for s in e.shots:
            w, l = detect_properties(s.preferred), detect_properties(s.dispreferred)
            for d in (d for d in DIMENSIONS if won[d] != lost[d] and (w[d] != l[d] or not only_differing_shots)):
                score += (w[d] == won[d]) - (w[d] == lost[d])
        return 1.0 if score > 0 else 0.0 if score < 0 else 0.5

    ideal = sum(bayes_optimal_choice([(s.preferred, s.dispreferred) for s in e.shots],
                                     (e.query.preferred, e.query.dispreferred), 2, preferred_only=preferred_only)
                for e in episodes) / len(episodes)  # fmt: skip
    counted = [sum(count(e, False) for e in episodes) / len(episodes)]
    if not preferred_only:
        counted.append(sum(count(e, True) for e in episodes) / len(episodes))
    assert len(episodes) >= 900 and 0.5 < max(counted) <= ideal
