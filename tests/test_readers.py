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
    known = "roleplay, elix, review_4shot, review_8shot, dpo_json, canonical"
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
