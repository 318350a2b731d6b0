"""The evaluation job: its numbers against a direct computation, the order swap, the report files."""

import csv
import dataclasses
import hashlib
import json
import math
import re

import pytest
import torch
from conftest import first_answer

from fspo_ray.data.episodes import Episode, build_episodes
from fspo_ray.data.readers import read_pairs
from fspo_ray.data.synthetic import on_task, render_answer, write_synthetic
from fspo_ray.data.tokenize import fit_episode
from fspo_ray.evaluate.accuracy import accuracy_by_shots, bayes_optimal_by_shots, verdicts, wilson_interval
from fspo_ray.evaluate.winrate import oracle_judge
from fspo_ray.judge import judge_both_orders, parse_verdict


def test_wilson_interval_matches_the_formula():
    low, high = wilson_interval(5, 10)
    z = 1.96
    half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == pytest.approx(
        1.0
    )


def test_accuracy_by_shots_from_log_probs():
    rows = [  # margin = β((pc - rc) - (pr - rr))
        {"k": 0, "policy_chosen": -1.0, "reference_chosen": -2.0, "policy_rejected": -3.0, "reference_rejected": -3.0},
        {"k": 0, "policy_chosen": -5.0, "reference_chosen": -2.0, "policy_rejected": -3.0, "reference_rejected": -3.0},
        {"k": 2, "policy_chosen": -1.0, "reference_chosen": -1.0, "policy_rejected": -4.0, "reference_rejected": -2.0},
        {"k": 2, "policy_chosen": -1.0, "reference_chosen": -1.0, "policy_rejected": -1.0, "reference_rejected": -2.0},
    ]
    for row, used in zip(rows, (0, 0, 2, 1)):
        row["shots_used"] = used  # the last episode lost a shot to the length limit
    table = accuracy_by_shots(rows, beta=0.5)
    assert [(r["k"], r["n"], r["accuracy"]) for r in table] == [(0, 2, 0.5), (2, 2, 0.5)]
    assert [(r["shots_used_mean"], r["episodes_that_lost_shots"]) for r in table] == [(0.0, 0), (1.5, 1)]
    assert table[0]["margin"] == pytest.approx((0.5 * 1 + 0.5 * -3) / 2)
    assert table[1]["margin"] == pytest.approx((0.5 * 2 + 0.5 * -1) / 2)


def test_the_gap_to_the_ideal_reader_pairs_each_episode_with_itself(tmp_path):
    data = write_synthetic(str(tmp_path), n_train_users=2, n_test_users=2, pairs_per_user=8, dims_per_user=2)
    episodes, _ = build_episodes(read_pairs(data["test"]), shots=2, passes=1, seed=0)
    users = json.load(open(data["users"]))
    first = [e.episode_id for e in episodes[:3]]
    rows = [  # the model's verdict at 0 shots on three of the episodes: right, wrong, right (the rest did not fit)
        {"k": 0, "episode_id": first[0], "policy_chosen": -1.0, "reference_chosen": -2.0, "policy_rejected": -3.0,
         "reference_rejected": -3.0},
        {"k": 0, "episode_id": first[1], "policy_chosen": -5.0, "reference_chosen": -2.0, "policy_rejected": -3.0,
         "reference_rejected": -3.0},
        {"k": 0, "episode_id": first[2], "policy_chosen": -1.0, "reference_chosen": -1.0, "policy_rejected": -4.0,
         "reference_rejected": -2.0},
    ]  # fmt: skip
    assert verdicts(rows, beta=0.1) == {(first[0], 0): True, (first[1], 0): False, (first[2], 0): True}
    (row,) = bayes_optimal_by_shots(episodes, [0], users, preferred_only=True, right=verdicts(rows, beta=0.1))
    # Without shots the ideal reader is a coin on every episode: 0.5 - 1, 0.5 - 0, 0.5 - 1 on the three scored.
    assert (row["n"], row["accuracy"]) == (len(episodes), 0.5)
    differences = [-0.5, 0.5, -0.5]
    mean = -1 / 6
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in differences) / 2) / math.sqrt(3)
    assert row["model_gap"]["n"] == 3 and row["model_gap"]["gap"] == pytest.approx(mean)
    assert row["model_gap"]["ci"] == pytest.approx([mean - half, mean + half])
    assert "model_gap" not in bayes_optimal_by_shots(episodes, [0], users, preferred_only=True)[0]


def test_the_gap_to_the_ideal_reader_is_split_by_whether_training_held_the_users_combination(tmp_path):
    data = write_synthetic(str(tmp_path), n_train_users=2, n_test_users=2, pairs_per_user=8, dims_per_user=2)
    episodes, _ = build_episodes(read_pairs(data["test"]), shots=2, passes=1, seed=0)
    users = json.load(open(data["users"]))
    # test-00000 holds a pole combination no training user holds; test-00001 one that training users hold.
    assert [(e.user_id, users[e.user_id]["novel_combination"]) for e in episodes] == [
        ("test-00000", True), ("test-00000", True), ("test-00001", False), ("test-00001", False)]
    right = {(episodes[0].episode_id, 0): True, (episodes[1].episode_id, 0): False,
             (episodes[2].episode_id, 0): True, (episodes[3].episode_id, 0): True}  # fmt: skip
    (row,) = bayes_optimal_by_shots(episodes, [0], users, preferred_only=True, right=right)
    # The ideal reader is a coin at 0 shots: novel 0.5 - 1 and 0.5 - 0, trained 0.5 - 1 twice.
    half = 1.96 * math.sqrt(0.5**2 + 0.5**2) / math.sqrt(2)
    assert row["model_gap_by_combination"]["novel"] == {"n": 2, "gap": 0.0, "ci": pytest.approx([-half, half])}
    assert row["model_gap_by_combination"]["trained"] == {"n": 2, "gap": -0.5, "ci": [-0.5, -0.5]}
    # Users with no such mark (real people, a generator's users) get the whole gap only.
    unmarked = {user_id: {k: v for k, v in user.items() if k != "novel_combination"} for user_id, user in users.items()}
    (row,) = bayes_optimal_by_shots(episodes, [0], unmarked, preferred_only=True, right=right)
    assert row["model_gap"]["n"] == 4 and "model_gap_by_combination" not in row


def test_a_judge_stuck_on_one_position_gives_no_consistent_verdict():
    always_first = lambda *args: "m"  # noqa: E731
    assert judge_both_orders(always_first, "q", "ours", "theirs", "d", {}) is None
    always_second = lambda *args: "M"  # noqa: E731
    assert judge_both_orders(always_second, "q", "ours", "theirs", "d", {}) is None


def test_oracle_judge_is_order_consistent_on_a_clear_preference():
    prefs = {"tone": "formal", "length": "brief"}
    steps = ["mix flour and water", "knead the dough well", "let it rise", "bake it in a hot oven"]
    q = "How do I bake bread?"
    good = render_answer(
        "bake bread", steps, {"tone": "formal", "length": "brief", "format": "prose", "mood": "reserved"}
    )
    bad = render_answer(
        "bake bread", steps, {"tone": "casual", "length": "detailed", "format": "prose", "mood": "reserved"}
    )
    assert judge_both_orders(oracle_judge, q, good, bad, "", prefs) == "win"
    assert judge_both_orders(oracle_judge, q, bad, good, "", prefs) == "loss"
    assert judge_both_orders(oracle_judge, q, good, good, "", prefs) is None  # a tie is dropped
    # Content first: the user's style on another task's steps loses to the wrong style on the asked task.
    off_task = good.replace("Mix flour and water", "Pick a sunny spot")
    assert judge_both_orders(oracle_judge, q, off_task, bad, "", prefs) == "loss"
    assert parse_verdict(" M") == "M" and parse_verdict("maybe") == "m" and parse_verdict("x") is None


@pytest.mark.slow
def test_a_lone_batch_inference_replica_runs_on_every_cpu(local_ray):
    """Ray gives a replica as many torch threads as CPUs it asked for: one replica on the 2-CPU Ray asks
    for both (with one it left a core idle, and evaluation took twice as long); two share them out. Each
    pass is sized the moment the one before it returns, while its replica is still handing its CPUs back."""
    import ray.data

    from fspo_ray.scheduling import replica_cpus

    class TorchThreads:  # defined here, so Ray ships it by value (workers cannot import a test module)
        def __call__(self, batch: dict) -> dict:
            return {"threads": [torch.get_num_threads()] * len(batch["id"])}

    # Materialized first, as evaluation does: a replica holding every CPU leaves none for upstream tasks.
    inputs = ray.data.range(4).materialize()
    for attempt in range(3):
        rows = inputs.map_batches(TorchThreads, concurrency=1, num_cpus=replica_cpus(1, on_gpu=False)).take_all()
        assert {row["threads"] for row in rows} == {2}, f"pass {attempt}"
    assert (replica_cpus(2, on_gpu=False), replica_cpus(1, on_gpu=True)) == (1, 1)


@pytest.mark.slow
def test_evaluate_job_report_matches_a_direct_computation(local_ray, trained_tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.models import build_tiny_model
    from jobs.evaluate import main

    users = write_synthetic(str(tmp_path / "users"), n_train_users=4, n_test_users=6, pairs_per_user=8)
    # The policy writes text that depends on its prompt; the random reference (also the base) writes "".
    policy, reference = trained_tiny, build_tiny_model(str(tmp_path / "r"), seed=2)
    out = tmp_path / "eval"
    # The opponent is a model folder (its answers go under the folder's name, "r"), given the shots as FSPO is.
    report = main([f"model={policy}", f"reference={reference}", f"base_model={reference}", f"out={out}",
                   f"datasets=[{users['test']}]", f"users_file={users['users']}", "max_shots=3", "shots=[0,1,3]",
                   "n_episodes=8", "n_queries=3", "max_new_tokens=8", "beta=0.5", f"opponent={reference}",
                   "baselines=[few_shot_base,oracle_prompt]"])  # fmt: skip

    # The same episodes, scored here with plain transformers: the first 8 in the seeded random order
    # (sha256 of "seed:episode_id"), which samples across users where sorting by id would not.
    episodes, _ = build_episodes(read_pairs(users["test"]), shots=3, passes=1, seed=0)
    by_id = sorted(episodes, key=lambda e: e.episode_id)[:8]
    episodes = sorted(episodes, key=lambda e: hashlib.sha256(f"0:{e.episode_id}".encode()).hexdigest())[:8]
    assert len({e.user_id for e in episodes}) > len({e.user_id for e in by_id})
    tokenizer = AutoTokenizer.from_pretrained(policy)
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in (policy, reference)]

    def logp(model, prompt, completion):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        return sum(logits[len(prompt) + t - 1, token].item() for t, token in enumerate(completion))

    for row in report["accuracy_by_shots"]:
        margins = []
        for episode in episodes:
            variant = dataclasses.replace(episode, shots=episode.shots[: row["k"]])  # its first k
            tokens = fit_episode(variant, tokenizer, max_length=1024, max_prompt_length=896).tokens
            pc, rc = (logp(m, tokens["prompt_ids"], tokens["chosen_ids"]) for m in models)
            pr, rr = (logp(m, tokens["prompt_ids"], tokens["rejected_ids"]) for m in models)
            margins.append(0.5 * ((pc - rc) - (pr - rr)))
        assert row["n"] == 8 and (row["shots_used_mean"], row["episodes_that_lost_shots"]) == (row["k"], 0)
        assert row["accuracy"] == sum(m > 0 for m in margins) / 8
        assert row["margin"] == pytest.approx(sum(margins) / 8, abs=1e-3)
    assert [r["k"] for r in report["accuracy_by_shots"]] == [0, 1, 3]

    # The tallies against the oracle's verdicts on the answers themselves (all 3 queries are in `examples`).
    wins, preferences = report["win_rate_vs_r"], json.loads(open(users["users"]).read())
    assert len(wins["examples"]) == 3
    assert all(x["fspo"] for x in wins["examples"])  # real answers, so the checks below compare text
    for name in ("fspo", "few_shot_base", "oracle_prompt"):
        verdicts = [judge_both_orders(oracle_judge, x["question"], x[name], x["r"], "",
                                      preferences[x["user_id"]]["preferences"]) for x in wins["examples"]]  # fmt: skip
        tally = (verdicts.count("win"), verdicts.count("loss"), verdicts.count(None))
        assert (wins[name]["wins"], wins[name]["losses"], wins[name]["dropped_inconsistent"]) == tally, name
        # The on-task rates are of these same answers (on_task itself is tested in test_synthetic.py).
        for system in (name, "r"):
            expected = sum(on_task(x[system], x["question"]) for x in wins["examples"]) / 3
            assert wins[name]["on_task" if system == name else "r_on_task"] == expected, system
        off_task = [{"question": x["question"], "answer": x[name]} for x in wins["examples"]
                    if not on_task(x[name], x["question"])]  # fmt: skip
        assert wins[name]["off_task_examples"] == off_task
    assert json.loads((out / "report.json").read_text())["accuracy_by_shots"] == report["accuracy_by_shots"]
    with open(out / "per_user.csv") as f:
        per_user = list(csv.DictReader(f))
    assert {r["measure"] for r in per_user} >= {"accuracy", "win_rate_fspo"}
    png = (out / "accuracy_vs_shots.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(out / "accuracy_vs_shots.png").shape[2] in (3, 4)


def test_endpoint_judge_speaks_the_openai_chat_protocol(judge_endpoint):
    from fspo_ray.judge import endpoint_judge

    # A judge that always prefers the answer saying "formal", wherever it stands.
    url = judge_endpoint(lambda prompt: "m" if "formal" in first_answer(prompt) else "M")
    judge = endpoint_judge(url, "judge", api_key="k")
    assert judge_both_orders(judge, "Q?", "a formal answer", "a casual one", "Likes formal.", {}) == "win"
    assert judge_both_orders(judge, "Q?", "a casual one", "a formal answer", "Likes formal.", {}) == "loss"
    path, auth, prompt = judge_endpoint.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert "User description: Likes formal." in prompt and "Question: Q?" in prompt


def test_an_earlier_report_is_not_replaced_unless_asked(tmp_path):
    from fspo_ray.config import ConfigError
    from fspo_ray.evaluate.run import EvaluateConfig, evaluate

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds results: pass overwrite=true"):
        evaluate(EvaluateConfig(model="tiny", datasets=["x.jsonl"], judge="none", out=str(tmp_path / "eval")))


@pytest.mark.slow
def test_a_local_judge_model_gives_its_own_choice_between_m_and_M(local_ray, trained_tiny, tmp_path):
    """judge=llm with a local model: its verdicts come from batch inference with the reply constrained to the
    tokens m and M; here they must equal the model's own preference between those two tokens, computed with
    plain transformers on the same prompts in both orders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.judge import judge_prompt
    from fspo_ray.models import build_tiny_model
    from jobs.evaluate import main

    users = write_synthetic(str(tmp_path / "users"), n_train_users=4, n_test_users=6, pairs_per_user=8)
    base = build_tiny_model(str(tmp_path / "base"), seed=2)
    report = main([f"model={trained_tiny}", f"reference={base}", f"base_model={base}", f"out={tmp_path / 'eval'}",
                   f"datasets=[{users['test']}]", "max_shots=1", "shots=[1]", "n_episodes=4", "n_queries=3",
                   "max_new_tokens=8", "judge=llm", f"judge_model={base}"])  # fmt: skip
    result, described = report["win_rate_vs_base"]["fspo"], json.loads(open(users["users"]).read())
    tokenizer, judge = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    m, big_m = tokenizer.convert_tokens_to_ids(["m", "M"])

    def verdict(question: str, first: str, second: str, description: str) -> str:
        ids = tokenizer(judge_prompt(question, first, second, description), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = judge(torch.tensor([ids])).logits[0, -1]
        return "m" if logits[m] > logits[big_m] else "M"

    tally = {"win": 0, "loss": 0, None: 0}
    for x in report["win_rate_vs_base"]["examples"]:
        description = described[x["user_id"]]["description"]
        said = [verdict(x["question"], x["fspo"], x["base"], description),
                verdict(x["question"], x["base"], x["fspo"], description)]  # fmt: skip
        assert x["verdicts_system_first_then_opponent_first"]["fspo"] == said  # the letters, not only tallies
        tally[{("m", "M"): "win", ("M", "m"): "loss"}.get(tuple(said))] += 1
    assert (result["wins"], result["losses"], result["dropped_inconsistent"]) == (tally["win"], tally["loss"],
                                                                                  tally[None])
    assert result["queries"] == 3 and "on_task" not in result  # on-task rates come with the oracle judge only


def test_a_shot_sets_targets_scored_together_equal_each_scored_alone(local_ray, trained_tiny, tmp_path):
    """targets_per_prompt=2: held-out episodes drawn by shot set and kept together; each (episode, k) is
    scored in its shot set's packed row (both targets' k-shot prompts after the shots once) with the
    log-probs of its own plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.data.tokenize import PromptStyle
    from fspo_ray.evaluate.accuracy import held_out_episodes, score_shots
    from fspo_ray.models import build_tiny_model

    users = write_synthetic(str(tmp_path / "users"), n_train_users=2, n_test_users=4, pairs_per_user=10)
    reference = build_tiny_model(str(tmp_path / "r"), seed=2)
    drawn = held_out_episodes([users["test"]], split=None, users=None, shots=3, seed=0, targets=2)
    episodes = [Episode.from_row(r) for r in drawn.take_all()]
    assert len(episodes) == 4 * 2 * 2  # users × windows (of 3 shots + K) × K
    assert all(a.shot_set == b.shot_set and a.shots == b.shots for a, b in zip(episodes[::2], episodes[1::2]))
    rows, skipped = score_shots(drawn, shots_list=[0, 1, 3], policy_path=trained_tiny, reference_path=reference,
                                max_length=1024, max_prompt_length=896, style=PromptStyle())  # fmt: skip
    assert skipped == 0 and len(rows) == 3 * len(episodes)
    tokenizer = AutoTokenizer.from_pretrained(trained_tiny)
    models = {"policy": AutoModelForCausalLM.from_pretrained(trained_tiny).eval(),
              "reference": AutoModelForCausalLM.from_pretrained(reference).eval()}  # fmt: skip
    by_id = {e.episode_id: e for e in episodes}
    for row in rows:
        variant = by_id[row["episode_id"]].first_shots(row["k"])
        tokens = fit_episode(variant, tokenizer, max_length=1024, max_prompt_length=896).tokens
        for name, model in models.items():
            for side in ("chosen", "rejected"):
                ids = tokens["prompt_ids"] + tokens[f"{side}_ids"]
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                start = len(tokens["prompt_ids"])
                expected = sum(logits[t - 1, ids[t]].item() for t in range(start, len(ids)))
                assert row[f"{name}_{side}"] == pytest.approx(expected, rel=1e-5, abs=1e-4), (row["episode_id"], name)


@pytest.mark.parametrize("settings,problem", [
    ({"judge": "votes", "opponent": "popularity"}, "opponent=popularity must be one of baselines=[...]"),
    ({"judge": "votes", "opponent": "base", "baselines": ["base"]}, "known baselines are"),
    ({"opponent": "pref_ft"}, "opponent=pref_ft need pref_ft=<the SFT run or HF folder>"),
    ({"baselines": ["population_model"]}, "baselines=[population_model] needs population_model=<the 0-shot run>"),
    ({"opponent": "no/such/folder"}, "model=no/such/folder: not a preset"),
    ({"targets_per_prompt": 0}, "targets_per_prompt=0 must be >= 1"),
])  # fmt: skip
def test_an_opponent_or_baseline_that_cannot_be_had_stops_before_any_work(tmp_path, settings, problem):
    from fspo_ray.config import InputError
    from fspo_ray.evaluate.run import EvaluateConfig, evaluate

    cfg = EvaluateConfig(model="tiny", datasets=["x.jsonl"], judge="none", out=str(tmp_path / "e"))
    with pytest.raises(InputError, match=re.escape(problem)):
        evaluate(dataclasses.replace(cfg, **settings))
