"""Make FSPO data: the paper's synthetic-preference recipe as Ray Data batch inference.

For each (persona, question) an instruction-tuned model writes the answer that persona would like
(`persona_answer_prompt`). Each persona's answer is paired with the answers written for `n_contrasts`
other personas to the same question (the paper's "response from a different user description"), and a
judge says which of the two the persona prefers (fspo_ray/generate/judging.py): the likelihood judge,
which scores each answer on its own with a local model, or the generative judge, which is asked in both
orders. Only a decided, order-free verdict becomes a labelled pair; the rest are counted, never silently
lost. With `validate=true` both judges first label a set of pairs whose answer is known
(fspo_ray/generate/known_truth.py), and the summary says how often each is right.

Every stage runs on `concurrency` replicas of the project's engines (vLLM where it runs, else
transformers; the likelihood judge on the scoring path evaluation uses); the generative judge may
instead be an OpenAI-compatible endpoint. In `out`:

    train.jsonl, test.jsonl   canonical pairs, split by persona (`test_fraction` of them held out)
    summary.json              the counts: rows, answers, the judge's kept, undecided, inconsistent and
                              malformed rows, per split; with validate=true each judge's known-truth record
    answers.jsonl             every answer written, appended as it streams in
    judged.jsonl              every (persona, question, contrast) row's verdict and outcome, likewise
    validation.jsonl          validate=true: every known-truth pair with each judge's verdict
    config.json               the settings that shape a row: a re-run with the same ones resumes,
                              skipping rows already judged (not those dropped as malformed); with
                              others it stops
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time

from fspo_ray.batch_inference import batch_generate
from fspo_ray.config import ConfigError
from fspo_ray.console import streamed_rows
from fspo_ray.data.prompts import persona_answer_prompt
from fspo_ray.data.readers import DataError, raw_rows
from fspo_ray.engines import Sampling
from fspo_ray.generate.config import RESUME_SAFE, GenerateDataConfig, is_endpoint, judge_of, validate
from fspo_ray.generate.judging import tally, verdicts
from fspo_ray.generate.known_truth import validate_judges
from fspo_ray.models import resolve_model

SEEDS = os.path.join(os.path.dirname(__file__), "seeds")


def load_personas(spec: str, n: int | None) -> list[dict]:
    """[{user_id, user_description}], in file order; ids unique, descriptions non-empty."""
    path = os.path.join(SEEDS, "personas.jsonl") if spec == "shipped" else spec
    if not os.path.isfile(path):
        raise ConfigError(f"personas={spec}: no such file")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
        rows = [(number, {"user_id": f"persona-{i:03d}", "user_description": text}) for i, (number, text)
                in enumerate(lines)]  # fmt: skip
    else:
        rows = list(raw_rows(path, None))
    personas, seen = [], set()
    for number, row in rows:
        user_id, description = row.get("user_id"), row.get("user_description")
        for field, value in (("user_id", user_id), ("user_description", description)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path} row {number}: {field} must be a non-empty string, got {value!r}")
        if user_id in seen:
            raise DataError(f"{path} row {number}: user_id {user_id!r} appears twice")
        seen.add(user_id)
        personas.append({"user_id": user_id.strip(), "user_description": description.strip()})
    if n is not None and n > len(personas):
        raise ConfigError(f"n_personas={n}, but {path} holds {len(personas)} personas")
    return personas[:n]


def load_questions(spec: str, domain: str, n: int | None, seed: int) -> list[str]:
    path = os.path.join(SEEDS, f"questions-{domain}.txt") if spec == "shipped" else spec
    if not os.path.isfile(path):
        raise ConfigError(f"questions={spec}: no such file")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            rows = [(number, {"question": line}) for number, line in enumerate(f, 1) if line.strip()]
    else:
        rows = list(raw_rows(path, None))
    questions, seen = [], set()
    for number, row in rows:
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path} row {number}: question must be a non-empty string, got {question!r}")
        if question.strip() in seen:
            raise DataError(f"{path} row {number}: question {question.strip()!r} appears twice")
        seen.add(question.strip())
        questions.append(question.strip())
    if n is not None and n > len(questions):
        raise ConfigError(f"n_questions={n}, but {path} holds {len(questions)} questions")
    return questions if n is None else random.Random(seed).sample(questions, n)


def contrasts(personas: list[dict], user_id: str, question: str, n: int, seed: int) -> list[dict]:
    """The `n` other personas whose answers to `question` are paired with `user_id`'s: fixed by the seed,
    the persona and the question, so a resumed run pairs exactly as the first did."""
    others = [p for p in personas if p["user_id"] != user_id]
    return random.Random(f"{seed}|{user_id}|{question}").sample(others, n)


def held_out_personas(user_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ranking of the personas by hash; the first `fraction` of them (at least one) are held out."""
    if fraction == 0 or len(user_ids) < 2:
        return set()
    ranked = sorted(user_ids, key=lambda u: hashlib.sha256(f"{seed}|{u}".encode()).hexdigest())
    return set(ranked[: min(len(ranked) - 1, max(1, round(fraction * len(ranked))))])


def _read_jsonl(path: str) -> list[dict]:
    """Our own append-only file; a last line cut short by a crash is left for the re-run to redo."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _prepare_out(cfg: GenerateDataConfig) -> None:
    """A new folder, or one this job wrote with the same row-shaping settings."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_SAFE}
    record = os.path.join(cfg.out, "config.json")
    if os.path.isfile(record):
        with open(record) as f:
            earlier = json.load(f)
        differ = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
        if differ:
            shown = ", ".join(f"{k} ({earlier.get(k)!r} there, {settings.get(k)!r} now)" for k in differ)
            raise ConfigError(f"out={cfg.out} was made with other settings: {shown}; choose another out")
        return
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        raise ConfigError(f"out={cfg.out} holds files this job did not write; choose another out")
    os.makedirs(cfg.out, exist_ok=True)
    with open(record, "w") as f:
        json.dump(settings, f, indent=1)


def _answer_problem(answer: dict | None) -> str | None:
    if answer is None:
        return "no answer"
    if answer["error"]:
        return answer["error"]
    return None if answer["text"].strip() else "empty answer"


def generate_data(cfg: GenerateDataConfig) -> dict:
    """Write `cfg.out` (see the module's docstring) and return the summary."""
    validate(cfg)
    started = time.monotonic()
    personas = load_personas(cfg.personas, cfg.n_personas)
    questions = load_questions(cfg.questions, cfg.domain, cfg.n_questions, cfg.seed)
    if cfg.n_contrasts > len(personas) - 1:
        raise ConfigError(f"n_contrasts={cfg.n_contrasts} needs at least {cfg.n_contrasts + 1} personas; "
                          f"there are {len(personas)}")  # fmt: skip
    _prepare_out(cfg)
    judge = judge_of(cfg)
    judge_model = cfg.judge_model if is_endpoint(cfg.judge_model) else resolve_model(cfg.judge_model or cfg.model)
    # First, where asked: how often each judge is right where the answer is known, before it labels anything.
    validation = validate_judges(cfg, judge_model) if cfg.validate else None

    by_id = {p["user_id"]: p for p in personas}
    rows = [(p["user_id"], q, c["user_id"]) for p in personas for q in questions
            for c in contrasts(personas, p["user_id"], q, cfg.n_contrasts, cfg.seed)]  # fmt: skip
    judged_path, answers_path = os.path.join(cfg.out, "judged.jsonl"), os.path.join(cfg.out, "answers.jsonl")
    # A row dropped as malformed (a failed or empty answer, an endpoint's error) is tried again on a re-run.
    judged = {(r["user_id"], r["question"], r["contrast_id"]): r for r in _read_jsonl(judged_path)
              if not r["outcome"].startswith("malformed")}  # fmt: skip
    todo = [r for r in rows if r not in judged]
    print(f"data: {len(personas)} personas × {len(questions)} questions × {cfg.n_contrasts} contrast(s) = "
          f"{len(rows)} rows; {len(rows) - len(todo)} judged before, {len(todo)} to go", flush=True)  # fmt: skip

    answers = {(a["user_id"], a["question"]): a for a in _read_jsonl(answers_path) if not _answer_problem(a)}
    needed = sorted({(u, q) for u, q, _ in todo} | {(c, q) for _, q, c in todo})
    missing = [{"user_id": u, "question": q, "prompt": persona_answer_prompt(by_id[u]["user_description"], q)}
               for u, q in needed if (u, q) not in answers]  # fmt: skip
    if missing:
        sampling = Sampling(cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
        dataset = batch_generate(missing, resolve_model(cfg.model), cfg.backend, sampling, batch_size=cfg.batch_size,
                                 concurrency=cfg.concurrency, chat=True)  # fmt: skip
        with open(answers_path, "a", encoding="utf-8") as f:
            for row in streamed_rows(dataset, len(missing), "answers"):
                answer = {k: row[k] for k in ("user_id", "question", "text", "completion_tokens", "error")}
                answer["text"] = answer["text"].strip()
                answers[row["user_id"], row["question"]] = answer
                f.write(json.dumps(answer) + "\n")

    comparisons = []
    with open(judged_path, "a", encoding="utf-8") as f:
        for u, q, c in todo:
            own, other = answers.get((u, q)), answers.get((c, q))
            problem = _answer_problem(own) or _answer_problem(other)
            if not problem and own["text"] == other["text"]:
                problem = "the two answers are the same text"
            if problem:
                judged[u, q, c] = {"user_id": u, "question": q, "contrast_id": c, "outcome": "malformed_answer",
                                   "problem": problem}  # fmt: skip
                f.write(json.dumps(judged[u, q, c]) + "\n")
                continue
            comparisons.append({"key": json.dumps([u, q, c]), "question": q,
                                "description": by_id[u]["user_description"],
                                "contrast_description": by_id[c]["user_description"],
                                "own": own["text"], "contrast": other["text"]})  # fmt: skip
        if comparisons:
            for key, verdict in verdicts(judge, judge_model, comparisons, cfg, f"judging ({judge})"):
                u, q, c = json.loads(key)
                judged[u, q, c] = {"user_id": u, "question": q, "contrast_id": c, "judge": judge, **verdict,
                                   "own": answers[u, q]["text"], "contrast": answers[c, q]["text"]}  # fmt: skip
                f.write(json.dumps(judged[u, q, c]) + "\n")
                f.flush()
    return _write_outputs(cfg, judge, rows, judged, answers, by_id, validation, time.monotonic() - started)


def _write_outputs(cfg, judge, rows, judged, answers, by_id, validation, seconds) -> dict:
    """train.jsonl and test.jsonl from every kept row (this run's and earlier ones'), and the summary."""
    held_out = held_out_personas(sorted(by_id), cfg.test_fraction, cfg.seed)
    splits = {"train": [], "test": []}
    for u, q, c in rows:
        row = judged[u, q, c]
        if row["outcome"] not in ("own", "contrast"):
            continue
        won, lost = (u, c) if row["outcome"] == "own" else (c, u)
        splits["test" if u in held_out else "train"].append({
            "user_id": u, "question": q,
            "preferred": row["own" if won == u else "contrast"], "dispreferred": row["contrast" if won == u else "own"],
            "user_description": by_id[u]["user_description"],
            "dispreferred_description": by_id[lost]["user_description"],
        })  # fmt: skip
    for split, pairs in splits.items():
        with open(os.path.join(cfg.out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
    used = {(u, q) for u, q, _ in rows} | {(c, q) for _, q, c in rows}
    outcomes = [judged[r] for r in rows]
    summary = {
        "rows": len(rows),
        "answers": {"written": len(used),
                    "malformed": sum(_answer_problem(answers.get(k)) is not None for k in used),
                    "reached_max_new_tokens": sum(answers[k]["completion_tokens"] >= cfg.max_new_tokens
                                                  for k in used if k in answers)},
        "malformed_answer": sum(o["outcome"] == "malformed_answer" for o in outcomes),
        "judge": judge,
        **({"judge_margin": cfg.judge_margin} if judge == "likelihood" else {}),
        **tally(o for o in outcomes if o["outcome"] != "malformed_answer"),
        "train": {"personas": len(set(by_id) - held_out), "pairs": len(splits["train"])},
        "test": {"personas": len(held_out), "pairs": len(splits["test"])},
        "seconds": round(seconds, 1),
        **({"validation": validation} if validation else {}),
    }  # fmt: skip
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
