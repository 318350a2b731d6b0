"""Reading each input format into `PreferencePair`s (fspo-method.md §1.1), and the errors users see."""

import dataclasses
import json
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fspo_ray.data.readers import DataError, PreferencePair, read_pairs, resolve_format

P = PreferencePair
ROLEPLAY = [  # the persona description nested, as the HF data set has it
    {"x": " What is tea? ", "yw": "A drink.\n", "yl": "\tA plant", "level": "p-1",
     "score_persona": {"persona_description": " Likes brevity. "}},
    {"x": "Why?", "yw": "Because.", "yl": "No idea.", "level": "p-2",
     "score_persona": {"persona_description": "Curious."}},
]  # fmt: skip
ROLEPLAY_PAIRS = [
    P("p-1", "What is tea?", "A drink.", "A plant", "Likes brevity."),
    P("p-2", "Why?", "Because.", "No idea.", "Curious."),
]
ELIX = [
    {"prompt": " Explain gravity ", "response_x": "Things fall.", "response_y": "Spacetime curves.", "label": 0,
     "level_x": "a child", "level_y": "a physicist", "scorer_level": "a child"},
    {"prompt": "Explain rain", "response_x": "Water falls.", "response_y": "Vapour condenses.", "label": 1,
     "level_x": "a child", "level_y": "an expert", "scorer_level": "an expert"},
]  # fmt: skip
ELIX_PAIRS = [  # label 0: response_x wins; label 1: response_y wins. The loser's level describes it.
    P("a child", "Explain gravity", "Things fall.", "Spacetime curves.",
      "The user is a child.", "The user is a physicist."),
    P("an expert", "Explain rain", "Vapour condenses.", "Water falls.",
      "The user is an expert.", "The user is a child."),
]  # fmt: skip
CANONICAL = [
    {"user_id": 7, "question": " Q1 ", "preferred": "P1", "dispreferred": "D1",
     "user_description": " Likes P. ", "dispreferred_description": "Likes D."},
    {"user_id": 9, "question": "Q2", "preferred": "P2", "dispreferred": "D2"},
]  # fmt: skip
CANONICAL_PAIRS = [P("7", "Q1", "P1", "D1", "Likes P.", "Likes D."), P("9", "Q2", "P2", "D2")]
DPO = {
    " Q1 ": {"responses": [" r0 ", "r1", "r2"], "pairs": [[0, 1], [2, 1]], "sft_target": "r0"},
    "Q2": {"responses": ["a", "b"], "pairs": [[1, 0]], "sft_target": "b"},
}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def save_dataset(path, rows, splits=None) -> str:
    data = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({s: data for s in splits}) if splits else data).save_to_disk(str(path))
    return str(path)


def read(spec, **kwargs) -> list[PreferencePair]:
    return list(read_pairs(spec, **kwargs))


def bare(pairs) -> list[PreferencePair]:
    """The pairs without the fields that depend on where they were read from."""
    return [dataclasses.replace(p, source="", order=0) for p in pairs]


# 1. Each format, from JSONL


def test_roleplay_nested_and_flat_persona_description(tmp_path):
    flat = {k: v for k, v in ROLEPLAY[1].items() if k != "score_persona"}
    flat["score_persona.persona_description"] = "  Curious.\n"
    path = write_jsonl(tmp_path / "rp.jsonl", [ROLEPLAY[0], flat])
    pairs = read(f"roleplay:{path}")
    assert bare(pairs) == ROLEPLAY_PAIRS
    assert [p.source for p in pairs] == [f"{path} row 1", f"{path} row 2"]


def test_elix_label_picks_the_preferred_response(tmp_path):
    assert bare(read("elix:" + write_jsonl(tmp_path / "e.jsonl", ELIX))) == ELIX_PAIRS


def test_review_descriptions(tmp_path):
    row = dict(ELIX[1], scorer_level="positive+concise", level_x="negative+verbose", level_y="positive+concise")
    [pair] = read("review_8shot:" + write_jsonl(tmp_path / "r.jsonl", [row]))
    assert bare([pair]) == [P("positive+concise", "Explain rain", "Vapour condenses.", "Water falls.",
                              "This user prefers positive and concise reviews.",
                              "This user prefers negative and verbose reviews.")]  # fmt: skip


def test_canonical_with_integer_ids_and_optional_descriptions(tmp_path):
    rows = CANONICAL + [{"user_id": "u3", "question": "Q3", "preferred": "P3", "dispreferred": "D3",
                         "user_description": "   "}]  # fmt: skip
    pairs = read("canonical:" + write_jsonl(tmp_path / "c.jsonl", rows))
    assert bare(pairs) == CANONICAL_PAIRS + [P("u3", "Q3", "P3", "D3")]


def test_dpo_json_one_pair_per_entry_of_pairs(tmp_path):
    path = tmp_path / "sampled.json"
    path.write_text(json.dumps(DPO))
    pairs = read(f"dpo_json:{path}")
    assert bare(pairs) == [P(None, "Q1", "r0", "r1"), P(None, "Q1", "r2", "r1"), P(None, "Q2", "b", "a")]
    assert pairs[1].source == f"{path} prompt #1 (' Q1 ') pairs[1]"


# 2. The same rows from Parquet and from `datasets` save_to_disk folders

SAME_ROWS = [
    ("roleplay", ROLEPLAY, ROLEPLAY_PAIRS),
    ("elix", ELIX, ELIX_PAIRS),
    ("canonical", CANONICAL, CANONICAL_PAIRS),
]


@pytest.mark.parametrize("fmt,rows,expected", SAME_ROWS)
def test_parquet_and_save_to_disk_match_jsonl(tmp_path, fmt, rows, expected):
    from_jsonl = bare(read(f"{fmt}:" + write_jsonl(tmp_path / "a.jsonl", rows)))
    assert from_jsonl == expected
    assert bare(read(f"{fmt}:" + write_parquet(tmp_path / "a.parquet", rows))) == from_jsonl
    assert bare(read(f"{fmt}:" + save_dataset(tmp_path / "ds", rows))) == from_jsonl
    both = save_dataset(tmp_path / "dd", rows, splits=["train", "test"])
    assert bare(read(f"{fmt}:{both}", split="test")) == from_jsonl
    assert [p.source for p in read(f"{fmt}:{both}", split="train")] == [f"{both} row 1", f"{both} row 2"]


# 3. Format inference and resolve_format


@pytest.mark.parametrize("fmt,rows,expected", SAME_ROWS)
def test_format_inferred_from_columns(tmp_path, fmt, rows, expected):
    for path in (write_jsonl(tmp_path / "a.jsonl", rows), write_parquet(tmp_path / "a.parquet", rows)):
        assert resolve_format(path) == fmt
        assert bare(read(path)) == expected


def test_resolve_format(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", ELIX)
    assert resolve_format(f"review_8shot:{path}") == "review_8shot"  # a prefix wins over the columns
    (tmp_path / "d.json").write_text(json.dumps(DPO))
    assert resolve_format(str(tmp_path / "d.json")) == "dpo_json"
    assert resolve_format(save_dataset(tmp_path / "dd", ROLEPLAY, ["train"]), split="train") == "roleplay"


def test_unknown_prefix_names_the_known_formats():
    known = "roleplay, elix, review_4shot, review_8shot, dpo_json, canonical, global_dialogues"
    with pytest.raises(DataError, match=re.escape(f"unknown data format 'foo' in 'foo:/path'; known formats: {known}")):
        read("foo:/path")


def test_unrecognised_columns_are_named(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"b": 1, "a": 2}])
    message = f"{path} row 1: cannot tell the data format from columns ['a', 'b']"
    with pytest.raises(DataError, match=re.escape(message)):
        read(path)


# 4. Errors name the file, the row and the field


def test_bad_label_names_file_row_field_and_value(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", ELIX + [dict(ELIX[0], label="yes")])
    with pytest.raises(DataError, match=re.escape(f"{path} row 3: field 'label'") + r".*got 'yes'"):
        read(f"elix:{path}")


@pytest.mark.parametrize("value,problem", [(None, "must be a string, got None"), ("  ", "is empty")])
def test_missing_or_empty_field(tmp_path, value, problem):
    row = {k: v for k, v in CANONICAL[1].items() if k != "preferred"}  # None: the field is missing
    if value is not None:
        row["preferred"] = value
    path = write_jsonl(tmp_path / "c.jsonl", [CANONICAL[0], row])
    with pytest.raises(DataError, match=re.escape(f"{path} row 2: field 'preferred' {problem}")):
        read(f"canonical:{path}")


@pytest.mark.parametrize(
    "line,problem", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got [1, 2]")]
)
def test_bad_jsonl_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "c.jsonl", [CANONICAL[0], line])
    with pytest.raises(DataError, match=re.escape(f"{path} row 2: {problem}")):
        read(f"canonical:{path}")


def test_dpo_pair_index_out_of_range(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"Q": {"responses": ["a", "b"], "pairs": [[0, 1], [0, 2]]}}))
    message = f"{path} prompt #1 ('Q'): pairs[1] must be two different indices into 2 responses, got [0, 2]"
    with pytest.raises(DataError, match=re.escape(message)):
        read(str(path))


def test_dataset_dict_needs_a_split(tmp_path):
    path = save_dataset(tmp_path / "dd", ELIX, ["train", "test"])
    message = f"{path}: holds splits ['test', 'train']; choose one with split=NAME"
    with pytest.raises(DataError, match=re.escape(message)):
        read(f"elix:{path}")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{path}: no such file or directory")):
        read(f"elix:{path}")


# 5. User filter, blank lines, order


def test_user_filter_keeps_only_those_users(tmp_path):
    assert bare(read("elix:" + write_jsonl(tmp_path / "e.jsonl", ELIX), users=["an expert"])) == ELIX_PAIRS[1:]
    assert bare(read("canonical:" + write_jsonl(tmp_path / "c.jsonl", CANONICAL), users={"7"})) == CANONICAL_PAIRS[:1]


def test_blank_lines_are_not_rows_but_count_for_row_numbers(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["", CANONICAL[0], "   ", "", CANONICAL[1]])
    pairs = read(path)
    assert bare(pairs) == CANONICAL_PAIRS
    assert [p.source for p in pairs] == [f"{path} row 2", f"{path} row 5"]
    broken = write_jsonl(tmp_path / "b.jsonl", [CANONICAL[0], "", "{oops"])
    with pytest.raises(DataError, match=re.escape(f"{broken} row 3: not valid JSON")):
        read(broken)


def test_order_follows_the_file_and_separates_files(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", ELIX + ELIX + ELIX)
    first, second = read(f"elix:{path}"), read(f"elix:{path}", file_index=1)
    for pairs in (first, second):
        orders = [p.order for p in pairs]
        assert orders == sorted(orders) and len(set(orders)) == 6
    assert max(p.order for p in first) < min(p.order for p in second)  # file first, then row


def test_mixed_flat_and_nested_persona_columns(tmp_path):
    # A Parquet file built from both row shapes holds both columns, each null where the other is set.
    rows = [dict(ROLEPLAY[0], **{"score_persona.persona_description": None}),
            {**{k: v for k, v in ROLEPLAY[1].items() if k != "score_persona"},
             "score_persona": None, "score_persona.persona_description": "Curious."}]  # fmt: skip
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [p.user_description for p in read_pairs(f"roleplay:{path}")] == ["Likes brevity.", "Curious."]


@pytest.mark.parametrize("pair", [[0, 0], [True, False]])
def test_dpo_pairs_need_two_different_integer_indices(tmp_path, pair):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"Q": {"responses": ["a", "b"], "pairs": [pair]}}))
    with pytest.raises(DataError, match=re.escape("pairs[0] must be two different indices")):
        list(read_pairs(str(path)))


def test_byte_order_mark_and_integer_user_filter(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CANONICAL), encoding="utf-8-sig")
    assert [p.user_id for p in read_pairs(str(path), users=[9])] == ["9"]


# 6. Vote logs as Global Dialogues publishes them (a round's folder of CSV files)

QUESTIONS = {"q1": "What would help you?", "q2": "What do you fear?"}
THOUGHTS = {  # thought id -> (question, author, text as published: padded, with a comma and quotes)
    "t1": ("q1", "a1", ' Help with "paperwork", mostly. '),
    "t2": ("q1", "a2", "Booking doctors."),
    "t3": ("q1", "a3", "Nothing."),
    "t4": ("q2", "a1", "Losing control."),
    "t5": ("q2", "a4", "Bias."),
}
VOTES = [  # (question, voter, thought A, thought B, vote)
    ("q1", "v1", "t1", "t2", "Thought A"),
    ("q1", "v1", "t2", "t3", "Thought B"),
    ("q1", "v1", "t1", "t3", "I agree with both"),
    ("q1", "a1", "t1", "t2", "Thought B"),  # a1 wrote t1: a vote on the voter's own answer
    ("q2", "v1", "t4", "t5", "Thought A"),
    ("q2", "v2", "t5", "t4", "I'm not sure"),
    ("q1", "v2", "t3", "t1", "These are similar"),
    ("q1", "v2", "t3", "t1", "I disagree with both"),
    ("q2", "v2", "t4", "t5", "Thought B"),
    ("q2", "a4", "t4", "t5", "I agree with both"),  # not a preference, on the voter's own answer: counted once
]
VOTE_PAIRS = [  # the published files' rows 1, 2, 5, 9, as canonical pairs
    P("v1", "What would help you?", 'Help with "paperwork", mostly.', "Booking doctors."),
    P("v1", "What would help you?", "Nothing.", "Booking doctors."),
    P("v1", "What do you fear?", "Losing control.", "Bias."),
    P("v2", "What do you fear?", "Bias.", "Losing control."),
]
VOTE_SKIPS = {"not a preference: I agree with both": 2, "not a preference: I'm not sure": 1,
              "not a preference: These are similar": 1, "not a preference: I disagree with both": 1,
              "vote on the voter's own answer": 1}  # fmt: skip


def write_vote_log(folder, votes=VOTES, thoughts=THOUGHTS, questions=QUESTIONS, round_name="GDX") -> str:
    """A round's folder in the published layout: every cell quoted, a header row, a timestamp per vote."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{round_name}_verbatim_map.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerow(["Question ID", "Question Text", "Participant ID", "Thought ID", "Thought Text"])
        writer.writerows([q, questions[q], author, t, text] for t, (q, author, text) in thoughts.items())
    with open(folder / f"{round_name}_preference.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerow(["Question ID", "Participant ID", "Thought A ID", "Thought B ID", "Vote", "Timestamp"])
        writer.writerows([*vote, f"August 23, 2025 at 5:{i:02d} AM (GMT)"] for i, vote in enumerate(votes))
    return str(folder)


def test_vote_log_reads_decisive_votes_and_counts_what_it_skips(tmp_path):
    from fspo_ray.data.readers import skipped_rows

    folder = write_vote_log(tmp_path / "GDX")
    pairs = read(f"global_dialogues:{folder}")
    assert bare(pairs) == VOTE_PAIRS
    assert [p.source for p in pairs] == [f"{folder}/GDX_preference.csv row {n}" for n in (1, 2, 5, 9)]
    assert skipped_rows([f"global_dialogues:{folder}"]) == VOTE_SKIPS
    assert resolve_format(folder) == "global_dialogues"  # a folder holding a *_preference.csv
    assert bare(read(folder, users=["v2"])) == VOTE_PAIRS[3:]


@pytest.mark.parametrize("change,problem", [
    (lambda v, t: (v[:4] + [("q1", "v3", "t1", "t2", "Thought C")], t), "row 5: field 'Vote' must be one of"),
    (lambda v, t: (v + [("q1", "v3", "t1", "t9", "Thought A")], t),
     "row 11: field 'Thought B ID' names 't9', which the verbatim map lacks"),
    (lambda v, t: (v + [("q1", "v3", "t1", "t4", "Thought A")], t),
     "row 11: field 'Thought B ID' is an answer to question q2, not to the vote's q1"),
    (lambda v, t: (v, {**t, "t6": ("q2", "a5", "  ")}), "GDX_verbatim_map.csv row 6: field 'Thought Text' is empty"),
])  # fmt: skip
def test_a_malformed_vote_log_row_names_file_row_and_field(tmp_path, change, problem):
    votes, thoughts = change(list(VOTES), dict(THOUGHTS))
    folder = write_vote_log(tmp_path / "GDX", votes, thoughts)
    with pytest.raises(DataError, match=re.escape(problem)) as error:
        read(f"global_dialogues:{folder}")
    assert str(error.value).startswith(folder)


def test_a_vote_log_folder_holds_one_round(tmp_path):
    folder = write_vote_log(tmp_path / "two")
    write_vote_log(tmp_path / "two", round_name="GDY")
    with pytest.raises(DataError, match="exactly one \\*_preference.csv .* found GDX_preference.csv, GDY_pref"):
        read(f"global_dialogues:{folder}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "R_preference.csv").write_text('"Question ID","Vote"\n"q1","Thought A"\n')
    (tmp_path / "bad" / "R_verbatim_map.csv").write_text((tmp_path / "two" / "GDX_verbatim_map.csv").read_text())
    with pytest.raises(DataError, match=re.escape("R_preference.csv: missing column(s) ['Participant ID',")):
        read(str(tmp_path / "bad"))


def test_build_episodes_shows_what_the_model_reads_from_a_vote_log(tmp_path, capsys):
    from jobs import build_episodes

    folder, out = write_vote_log(tmp_path / "GDX"), tmp_path / "episodes.jsonl"
    summary = build_episodes.main([f"data=global_dialogues:{folder}", f"out={out}", "shots=2", "passes=1"])
    [episode] = [json.loads(line) for line in out.read_text().splitlines()]  # v1's 3 pairs; v2 has 1
    assert episode["user_id"] == "v1" and summary["users_without_episode"] == 1
    assert summary["rows_skipped"] == VOTE_SKIPS
    printed = capsys.readouterr().out
    assert "rows skipped (vote on the voter's own answer): 1" in printed
    assert "rows skipped (not a preference: I agree with both): 2" in printed
    shots = "".join(f"# Example {i}\n## Question \n{s['question']}\n## Preferred Response \n{s['preferred']}\n"
                    f"## Dispreferred Response \n{s['dispreferred']}\n\n"
                    for i, s in enumerate(episode["shots"], start=1))  # fmt: skip
    task = "Given the examples above, generate a preferred response to the following question."
    assert episode["prompt"] == f"{shots}# Task\n{task}\n## Question \n{episode['query']['question']}\n"
    shown = {(s["question"], s["preferred"], s["dispreferred"]) for s in [*episode["shots"], episode["query"]]}
    assert shown == {(p.question, p.preferred, p.dispreferred) for p in VOTE_PAIRS[:3]}
