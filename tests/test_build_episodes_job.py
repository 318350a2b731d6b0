"""`jobs.build_episodes` end to end: canonical JSONL in, one episode per line out (fspo-method.md §1.2-1.5).

The expected prompt text is written out here from the spec, not taken from fspo_ray.data.prompts.
"""

import json
import os
import subprocess
import sys

import pytest

from fspo_ray.config import ConfigError
from fspo_ray.models import build_tokenizer
from jobs import build_episodes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOT_KEYS = {"question", "preferred", "dispreferred"}
COUNTS = {"ana": 7, "ben": 7, "cy": 2}  # cy has fewer than shots + 1 = 3 pairs


def pair_row(user, k):
    padding = " It is" + " very," * 80 + " good." if k % 3 == 0 else ""
    return {  # every third pair is much longer, so episodes differ in length
        "user_id": user,
        "question": f"{user} asks question number {k}?",
        "preferred": f"{user} likes answer {k}, the good one.{padding}",
        "dispreferred": f"{user} dislikes answer {k}, the bad one.",
        "user_description": f"{user} is a test user.",
    }


def write_data(path, counts=COUNTS):
    rows = [pair_row(user, k) for user, n in counts.items() for k in range(n)]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def expected_prompt(shots, question):
    blocks = "".join(
        f"# Example {i}\n## Question \n{s['question']}\n## Preferred Response \n{s['preferred']}\n"
        f"## Dispreferred Response \n{s['dispreferred']}\n\n"
        for i, s in enumerate(shots, start=1)
    )
    task = "Given the examples above, generate a preferred response to the following question."
    return f"{blocks}# Task\n{task}\n## Question \n{question}\n"


def run_job(tmp_path, *args, name="episodes.jsonl"):
    out = tmp_path / name
    summary = build_episodes.main([f"data={tmp_path / 'pairs.jsonl'}", f"out={out}", *args])
    with open(out, encoding="utf-8") as f:
        return summary, [json.loads(line) for line in f]


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "pairs.jsonl")


@pytest.mark.parametrize("passes", [1, 3])
def test_episode_lines_hold_the_exact_prompt_and_completions(tmp_path, data, passes):
    summary, lines = run_job(tmp_path, "shots=2", f"passes={passes}")
    by_user = {}
    for row in data:
        by_user.setdefault(row["user_id"], []).append({k: row[k] for k in SHOT_KEYS})

    assert len(lines) == sum(n // 3 * passes for n in COUNTS.values()) == 4 * passes
    for line in lines:
        assert set(line) >= {"user_id", "prompt", "chosen", "rejected", "shots", "query", "user_description",
                             "shots_dropped"}  # fmt: skip
        user, shots, query = line["user_id"], line["shots"], line["query"]
        assert len(shots) == 2 and line["shots_dropped"] == 0
        assert all(set(s) == SHOT_KEYS for s in shots) and set(query) == SHOT_KEYS
        # Shots and query are distinct pairs, all of this user, exactly as written in the data.
        assert all(s in by_user[user] for s in shots) and query in by_user[user]
        assert query not in shots and shots[0] != shots[1]
        assert line["user_description"] == f"{user} is a test user."
        assert line["prompt"] == expected_prompt(shots, query["question"])
        assert line["chosen"] == f"## Preferred Response \n{query['preferred']}\n"
        assert line["rejected"] == f"## Preferred Response \n{query['dispreferred']}\n"

    in_no_episode = summary.pop("pairs_in_no_episode")
    assert summary == {
        "episodes_written": len(lines),
        "episodes_skipped_for_length": 0,
        "shots_dropped_for_length": 0,
        "users": 3,
        "users_without_episode": 1,
        "rows_skipped": {},  # JSONL rows are all pairs (a vote log's non-preferences: test_readers.py)
    }
    used = {(line["user_id"], s["question"]) for line in lines for s in [*line["shots"], line["query"]]}
    assert in_no_episode == len(data) - len(used)
    if passes == 1:  # ana and ben leave one pair out of their single pass; cy's 2 pairs are in none
        assert in_no_episode == 1 + 1 + 2


def test_a_user_with_too_few_pairs_gets_no_episode(tmp_path):
    write_data(tmp_path / "pairs.jsonl", {"ana": 3, "cy": 2, "dee": 1})
    summary, lines = run_job(tmp_path, "shots=2", "passes=2")
    assert {line["user_id"] for line in lines} == {"ana"}
    assert len(lines) == 2
    assert summary["users"] == 3
    assert summary["users_without_episode"] == 2
    assert summary["pairs_in_no_episode"] == 2 + 1


# --- the length policy: whole shots are dropped, oldest first; the query is never cut ----------------


@pytest.fixture
def tokenizer_dir(tmp_path, data):
    texts = [r[k] for r in data for k in ("question", "preferred", "dispreferred")]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    from transformers import AutoTokenizer

    return str(tmp_path / "tokenizer"), AutoTokenizer.from_pretrained(tmp_path / "tokenizer")


def measure(tokenizer, line):
    """Prompt lengths with the newest 2, 1 and 0 shots, and the longer completion's length (EOS included)."""
    n = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    shots, query = line["shots"], line["query"]
    prompt = {k: n(expected_prompt(shots[len(shots) - k:], query["question"]) if k else
                   f"# Task\nGenerate a response to the following question.\n## Question \n{query['question']}\n")
              for k in (2, 1, 0)}  # fmt: skip
    completion = max(n(f"## Preferred Response \n{query[k]}\n") + 1 for k in ("preferred", "dispreferred"))
    return prompt, completion


def expected_drops(prompt, completion, max_length, max_prompt_length):
    """Shots to drop per the spec (§1.5), or None if even the query alone does not fit."""
    for dropped, kept in enumerate((2, 1, 0)):
        if prompt[kept] <= max_prompt_length and prompt[kept] + completion <= max_length:
            return dropped
    return None


@pytest.mark.parametrize("binding", ["max_prompt_length", "max_length"])
def test_too_long_episodes_drop_their_oldest_shot(tmp_path, data, tokenizer_dir, binding):
    path, tokenizer = tokenizer_dir
    _, full = run_job(tmp_path, "shots=2", "passes=3", name="full.jsonl")
    sizes = [measure(tokenizer, line) for line in full]
    if binding == "max_prompt_length":  # every one-shot prompt fits, the longer two-shot ones do not
        limits = dict(max_length=4096, max_prompt_length=max(p[1] for p, _ in sizes))
    else:
        limits = dict(max_length=max(p[1] + c for p, c in sizes), max_prompt_length=4096)
    drops = [expected_drops(p, c, **limits) for p, c in sizes]
    assert 0 < drops.count(1) < len(drops) and set(drops) <= {0, 1}  # the limits test what they should

    summary, lines = run_job(tmp_path, "shots=2", "passes=3", f"tokenizer={path}",
                             *(f"{k}={v}" for k, v in limits.items()))  # fmt: skip
    assert len(lines) == len(full) == summary["episodes_written"]
    for line, whole, dropped in zip(lines, full, drops):
        assert line["query"] == whole["query"] and line["user_id"] == whole["user_id"]
        assert line["shots_dropped"] == dropped
        assert line["shots"] == whole["shots"][dropped:]  # the newest kept, the oldest dropped
        assert line["prompt"] == expected_prompt(line["shots"], line["query"]["question"])
        assert (line["chosen"], line["rejected"]) == (whole["chosen"], whole["rejected"])
    assert summary["shots_dropped_for_length"] == sum(drops) == sum(line["shots_dropped"] for line in lines)
    assert summary["episodes_skipped_for_length"] == 0


def test_episodes_whose_completion_cannot_fit_are_skipped_and_counted(tmp_path, data, tokenizer_dir):
    path, tokenizer = tokenizer_dir
    _, full = run_job(tmp_path, "shots=2", "passes=1", name="full.jsonl")
    shortest_completion = min(measure(tokenizer, line)[1] for line in full)
    summary, lines = run_job(tmp_path, "shots=2", "passes=1", f"tokenizer={path}",
                             f"max_length={shortest_completion - 1}", "max_prompt_length=4096")  # fmt: skip
    assert lines == []
    assert summary["episodes_written"] == 0
    assert summary["episodes_skipped_for_length"] == len(full) == 4
    assert summary["shots_dropped_for_length"] == 0


# --- as a command -------------------------------------------------------------------------------------


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "jobs.build_episodes", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_command_line_run_prints_its_summary(tmp_path, data):
    out = tmp_path / "cli.jsonl"
    result = run_module(f"data={tmp_path / 'pairs.jsonl'}", f"out={out}", "shots=2", "passes=1")
    assert result.returncode == 0, result.stderr
    summary_lines = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert len(summary_lines) == 1
    line = summary_lines[0]
    assert f"wrote 4 episodes (2 shots, 1 passes) of 3 users to {out}" in line
    assert "dropped for length: 0 shots, 0 episodes" in line
    assert "users with fewer than 3 pairs: 1" in line and "pairs in no episode: 4" in line
    with open(out, encoding="utf-8") as f:
        assert sum(1 for _ in f) == 4


def test_a_misspelled_key_fails_with_a_suggestion_and_no_traceback(tmp_path, data):
    result = run_module(f"data={tmp_path / 'pairs.jsonl'}", f"out={tmp_path / 'x.jsonl'}", "shot=3")
    assert result.returncode != 0
    assert "Did you mean" in result.stderr and "shots" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_an_earlier_output_is_not_replaced_unless_asked(tmp_path, data):
    run_job(tmp_path, "shots=2", "passes=1")
    with pytest.raises(ConfigError, match=r"already holds results: pass overwrite=true"):
        run_job(tmp_path, "shots=2", "passes=2")
    _, rows = run_job(tmp_path, "shots=2", "passes=2", "overwrite=true")
    assert len(rows) > 0
