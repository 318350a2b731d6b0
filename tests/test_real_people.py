"""Real people's votes: the baselines' numbers against formulas and direct computations, and jobs.evaluate on a
vote-log folder the test writes in the published format (tests never read ../shared)."""

import csv
import json
import math
import random

import pytest
import torch

from fspo_ray.data.episodes import Episode
from fspo_ray.data.prompts import Shot
from fspo_ray.data.readers import PreferencePair
from fspo_ray.evaluate.baselines import (
    Population,
    accuracy_table,
    counted_scores,
    fit_logistic,
    fit_population,
    head_to_head,
)


def test_accuracy_table_counts_ties_as_half_and_pairs_each_target_with_itself():
    scores = {("a", 0): 1.0, ("b", 0): -1.0, ("c", 0): 0.0, ("d", 0): -2.0,
              ("a", 8): 1.0, ("b", 8): 3.0, ("c", 8): 0.0, ("d", 8): 0.5}  # fmt: skip
    [zero, eight] = accuracy_table(scores, set(scores))
    assert (zero["k"], zero["n"], zero["accuracy"]) == (0, 4, 1.5 / 4)
    assert (eight["k"], eight["n"], eight["accuracy"]) == (8, 4, 3.5 / 4)
    differences = [0, 100, 0, 100]  # in points: b and d went from wrong to right
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    gain = eight["gain_over_0"]
    assert gain["points"] == 50.0 and gain["ci"] == pytest.approx([50 - 1.96 * sd / 2, 50 + 1.96 * sd / 2])
    assert "gain_over_0" not in zero


def test_head_to_head_is_decided_by_the_pairs_where_only_one_system_is_right():
    targets = {(e, 8) for e in "abcde"}
    mine = {("a", 8): 1, ("b", 8): 1, ("c", 8): -1, ("d", 8): -1, ("e", 8): 2}
    theirs = {("a", 8): -1, ("b", 8): 1, ("c", 8): 1, ("d", 8): -1, ("e", 8): -3}
    result = head_to_head(mine, theirs, targets, 8)
    assert (result["wins"], result["losses"], result["ties"]) == (2, 1, 2)  # a, e won; c lost; b, d agree
    assert result["win_rate"] == 2 / 3


def test_fit_logistic_solves_its_objective():
    gen = torch.Generator().manual_seed(0)
    d, prior = torch.randn(40, 5, generator=gen), torch.randn(5, generator=gen)
    w = fit_logistic(d, prior, l2=2.0).double()
    # At the minimum the gradient of Σ log(1 + exp(−w·d)) + (l2/2)‖w − prior‖² is zero.
    gradient = -d.double().T @ (1 - torch.sigmoid(d.double() @ w)) + 2.0 * (w - prior.double())
    assert gradient.abs().max() < 1e-4
    assert torch.allclose(fit_logistic(d, prior, l2=1e9), prior, atol=1e-6)  # a strong pull stays at the prior


def pair(user, question, preferred, dispreferred):
    return PreferencePair(user, question, preferred, dispreferred)


def test_popularity_and_the_longer_answer_from_the_populations_votes():
    population = [pair("p1", "Q", "x", "yy"), pair("p2", "Q", "x", "zzz"), pair("p3", "Q", "zzz", "yy")]
    fitted = fit_population(population, None, l2=1.0)
    # Smoothed win rates: x won 2 of 2 -> 3/4; yy 0 of 2 -> 1/4; zzz 1 of 2 -> 2/4; unseen "w" -> 1/2.
    assert [fitted.popularity("Q", a) for a in ("x", "yy", "zzz", "w")] == [0.75, 0.25, 0.5, 0.5]
    episodes = [Episode("u1", (), Shot("Q", "yy", "x"), episode_id="e1"),
                Episode("u2", (), Shot("Q", "w", "zzz"), episode_id="e2")]  # fmt: skip
    scores = counted_scores(episodes, [0], {-1: fitted}, None, person_l2=1.0)
    assert scores["popularity"] == {("e1", 0): 0.25 - 0.75, ("e2", 0): 0.0}  # e2: a tie, half right
    assert scores["longer_answer"] == {("e1", 0): 1, ("e2", 0): -2}
    assert "text_model" not in scores


def test_the_text_model_moves_toward_a_persons_own_votes():
    features = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0]),
                "c": torch.tensor([1.0, 0.1]), "d": torch.tensor([0.0, 1.1])}  # fmt: skip
    population = Population({}, {}, weights=torch.tensor([0.0, 0.3]))  # the population prefers the 2nd dimension
    shots = tuple(Shot("Q", "a", "b") for _ in range(4))  # this person keeps choosing the 1st
    episode = Episode("u", shots, Shot("Q", "c", "d"), episode_id="e")
    scores = counted_scores([episode], [0, 4], {-1: population}, features, person_l2=1.0)["text_model"]
    assert scores["e", 0] == pytest.approx(float((features["c"] - features["d"]) @ population.weights))
    assert scores["e", 0] < 0 < scores["e", 4]  # with none of their votes it follows everyone; with 4, them
    expected = fit_logistic(torch.stack([features["a"] - features["b"]] * 4), population.weights, 1.0)
    assert scores["e", 4] == pytest.approx(float((features["c"] - features["d"]) @ expected))


# jobs.evaluate on a vote-log folder


def vote_log(tmp_path):
    """Two questions, ten answers, twelve voters with six votes each, two of which are not preferences."""
    from test_readers import write_vote_log

    rng = random.Random(0)
    questions = {"q1": "What should an assistant do?", "q2": "What worries you?"}
    texts = ["Keep my calendar.", "Write emails for me, politely.", "Nothing at all.", "Plan meals and shopping.",
             "Explain my bills.", "Make decisions without asking.", "Share my data.", "Be wrong with confidence.",
             "Replace people.", "Nothing worries me."]  # fmt: skip
    thoughts = {f"t{i}": ("q1" if i < 5 else "q2", f"a{i}", text) for i, text in enumerate(texts)}
    votes = []
    for v in range(12):
        for n in range(6):
            q = "q1" if n % 2 == 0 else "q2"
            first, second = rng.sample([t for t, (qq, _, _) in thoughts.items() if qq == q], 2)
            vote = "I'm not sure" if n == 5 and v % 2 else rng.choice(["Thought A", "Thought B"])
            votes.append((q, f"v{v:02d}", first, second, vote))
    return write_vote_log(tmp_path / "GDZ", votes, thoughts, questions, round_name="GDZ")


@pytest.mark.slow
def test_evaluate_scores_a_vote_log_beside_every_baseline(local_ray, trained_tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.data.episodes import build_episodes
    from fspo_ray.data.readers import read_pairs
    from fspo_ray.data.tokenize import fit_episode
    from fspo_ray.evaluate.accuracy import draw_order
    from fspo_ray.models import build_tiny_model
    from jobs.evaluate import main

    folder, out = vote_log(tmp_path), tmp_path / "eval"
    base = build_tiny_model(str(tmp_path / "base"), seed=2)  # the reference, the base and the population model
    report = main([f"model={trained_tiny}", f"reference={base}", f"base_model={base}", f"out={out}",
                   f"datasets=[global_dialogues:{folder}]", "shots=[0,1,2]", "n_episodes=6", "judge=votes",
                   f"population_model={base}", "opponent=popularity",
                   "baselines=[few_shot_base,base_implicit_reward,population_model,popularity,longer_answer,"
                   "text_model]"])  # fmt: skip

    # The episodes a reader of the files would rebuild: one window of 3 per voter, the first 6 in the seeded order.
    pairs = list(read_pairs(f"global_dialogues:{folder}"))
    episodes, _ = build_episodes(pairs, shots=2, passes=1, seed=0)
    episodes = sorted(episodes, key=lambda e: draw_order(0, e.episode_id))[:6]
    systems = report["systems_by_shots"]
    assert set(systems) == {"fspo", "few_shot_base", "base_implicit_reward", "population_model", "popularity",
                            "longer_answer", "text_model"}  # fmt: skip
    assert all([(r["k"], r["n"]) for r in rows] == [(0, 6), (1, 6), (2, 6)] for rows in systems.values())
    assert report["rows_skipped"] == {"not a preference: I'm not sure": 6}

    # The longer answer and popularity (each voter's fold fitted on the other fold's votes), by hand.
    import hashlib

    def fold(user):
        return hashlib.sha256(user.encode()).digest()[0] % 2

    def half(x):
        return 1.0 if x > 0 else 0.0 if x < 0 else 0.5

    longer = sum(half(len(e.query.preferred) - len(e.query.dispreferred)) for e in episodes) / 6
    assert [r["accuracy"] for r in systems["longer_answer"]] == [longer] * 3

    def rate(e, answer):
        others = [p for p in pairs if fold(p.user_id) != fold(e.user_id) and p.question == e.query.question]
        wins = sum(p.preferred == answer for p in others)
        return (wins + 1) / (wins + sum(p.dispreferred == answer for p in others) + 2)

    popular = sum(half(rate(e, e.query.preferred) - rate(e, e.query.dispreferred)) for e in episodes) / 6
    assert [r["accuracy"] for r in systems["popularity"]] == pytest.approx([popular] * 3)

    # The base model prompted with the first k shots, and the model's implicit reward, with plain transformers.
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny)
    policy, reference = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (trained_tiny, base))

    def logp(model, prompt, completion):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        return sum(logits[len(prompt) + t - 1, token].item() for t, token in enumerate(completion))

    right = {}
    for k in (0, 1, 2):
        base_right = fspo_right = 0.0
        for e in episodes:
            tokens = fit_episode(Episode(e.user_id, e.shots[:k], e.query), tokenizer, max_length=1024,
                                 max_prompt_length=896).tokens  # fmt: skip
            p, c, r = tokens["prompt_ids"], tokens["chosen_ids"], tokens["rejected_ids"]
            base_margin = logp(reference, p, c) - logp(reference, p, r)
            fspo_margin = logp(policy, p, c) - logp(policy, p, r) - base_margin
            base_right += half(base_margin)
            fspo_right += half(fspo_margin)
            right[e.episode_id, k] = half(fspo_margin)
        assert systems["few_shot_base"][k]["accuracy"] == base_right / 6, k
        assert systems["fspo"][k]["accuracy"] == fspo_right / 6, k
    assert [r["accuracy"] for r in systems["base_implicit_reward"]] == [systems["few_shot_base"][0]["accuracy"]] * 3
    # The population model here is the base itself, against itself: every margin is 0, every pair a coin flip.
    assert [r["accuracy"] for r in systems["population_model"]] == [0.5] * 3

    # Judged by the people's own votes: FSPO wins where only it ranked the voted-for answer first.
    versus = report["win_rate_vs_popularity"]["fspo"]
    expected_wins = sum(right[e.episode_id, 2] > half(rate(e, e.query.preferred) - rate(e, e.query.dispreferred))
                        for e in episodes)  # fmt: skip
    assert versus["wins"] == expected_wins and versus["wins"] + versus["losses"] + versus["ties"] == 6
    for changed in report["changed_by_shots"]:  # people whose vote the model reads differently with 2 shots
        # One person can hold several target pairs: the pair's question and the answer not voted for say which
        # episode this is (the vote itself stays for the assertion below).
        [e] = [e for e in episodes if (e.user_id, e.query.question, e.query.dispreferred)
               == (changed["user_id"], changed["question"], changed["the_other_answer"])]  # fmt: skip
        assert right[e.episode_id, 0] != right[e.episode_id, 2]
        assert changed["shots"] == [vars(s) for s in e.shots] and changed["their_vote"] == e.query.preferred
    assert len(report["changed_by_shots"]) == sum(right[e.episode_id, 0] != right[e.episode_id, 2] for e in episodes)

    printed = capsys.readouterr().out
    assert "systems on the same 6 target pairs at every k" in printed
    assert f"win rate vs popularity, fspo, judged by each person's own vote at 2 shots: {versus['win_rate']:.3f}" \
        in printed or math.isnan(versus["win_rate"])
    assert json.loads((out / "report.json").read_text())["systems_by_shots"] == systems
    assert (out / "accuracy_vs_shots.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "per_user.csv") as f:
        assert {row["measure"] for row in csv.DictReader(f)} == {"accuracy"}
