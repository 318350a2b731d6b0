"""Vote logs as Global Dialogues publishes them: real people choosing between two other people's answers.

A round is a folder holding `<ROUND>_preference.csv` (one row per vote: Question ID, Participant ID,
Thought A ID, Thought B ID, Vote, Timestamp) and `<ROUND>_verbatim_map.csv` (the text of every answer, a
"thought": Question ID, Question Text, Participant ID, Thought ID, Thought Text; Participant ID there is
the answer's author). A vote of `Thought A` or `Thought B` is one preference pair of the voter (the user).

Two kinds of row carry no preference between two other people's answers and are skipped, each counted:
votes that are not a choice ("I agree with both", "I'm not sure", ...) and votes on the voter's own answer.
Anything else that does not fit (a missing column, an unknown vote, an answer id the map lacks, an answer to
another question) stops the read with the file, the row and the field named.
"""

from __future__ import annotations

import csv
import glob
import os
from collections import Counter
from collections.abc import Iterator

from fspo_ray.data.readers import DataError, show

CHOICES = {"Thought A": 0, "Thought B": 1}  # the vote -> which of (A, B) the voter preferred
NOT_A_PREFERENCE = ("I agree with both", "I disagree with both", "I'm not sure", "These are similar")
VOTE_COLUMNS = ("Question ID", "Participant ID", "Thought A ID", "Thought B ID", "Vote")
MAP_COLUMNS = ("Question ID", "Question Text", "Participant ID", "Thought ID", "Thought Text")
OWN_ANSWER = "vote on the voter's own answer"


def is_vote_log(path: str) -> bool:
    """A folder holding a round's preference file (what format inference looks for)."""
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*_preference.csv")))


def _one_file(folder: str, suffix: str) -> str:
    found = sorted(glob.glob(os.path.join(folder, f"*{suffix}")))
    if len(found) != 1:
        listed = ", ".join(os.path.basename(f) for f in found) or "none"
        raise DataError(f"{folder}: a vote-log folder holds exactly one *{suffix} (one round); found {listed}")
    return found[0]


def _rows(path: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(1-based data row number, row) of a CSV file whose header has `columns`."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a byte-order mark
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}")
        for number, row in enumerate(reader, start=1):
            if None in row or any(row[c] is None for c in columns):  # more or fewer cells than the header
                raise DataError(f"{path} row {number}: {len(row) - (None in row)} cells where the header has "
                                f"{len(reader.fieldnames)}")  # fmt: skip
            yield number, {c: row[c].strip() for c in columns}


def _thoughts(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """({thought id: {question, author, text}}, {question id: question text}) of a verbatim map."""
    thoughts, questions = {}, {}
    for number, row in _rows(path, MAP_COLUMNS):
        where = f"{path} row {number}"
        for column in ("Question ID", "Question Text", "Thought ID", "Thought Text"):
            if not row[column]:
                raise DataError(f"{where}: field {column!r} is empty")
        if row["Thought ID"] in thoughts:
            raise DataError(f"{where}: field 'Thought ID' repeats {show(row['Thought ID'])}")
        thoughts[row["Thought ID"]] = {"question": row["Question ID"], "author": row["Participant ID"],
                                       "text": row["Thought Text"]}  # fmt: skip
        questions.setdefault(row["Question ID"], row["Question Text"])
    return thoughts, questions


def read_vote_log(folder: str) -> tuple[list[tuple[int, str, dict]], dict[str, int]]:
    """([(row number, where, canonical pair fields)], {why skipped: rows}) of one round's folder."""
    votes = _one_file(folder, "_preference.csv")
    thoughts, questions = _thoughts(_one_file(folder, "_verbatim_map.csv"))
    pairs, skipped = [], Counter()
    for number, row in _rows(votes, VOTE_COLUMNS):
        where = f"{votes} row {number}"
        vote = row["Vote"]
        if vote in NOT_A_PREFERENCE:
            skipped[f"not a preference: {vote}"] += 1
            continue
        if vote not in CHOICES:
            raise DataError(f"{where}: field 'Vote' must be one of {[*CHOICES, *NOT_A_PREFERENCE]}, got {show(vote)}")
        if not row["Participant ID"]:
            raise DataError(f"{where}: field 'Participant ID' is empty")
        answers = []
        for column in ("Thought A ID", "Thought B ID"):
            thought = thoughts.get(row[column])
            if thought is None:
                raise DataError(f"{where}: field {column!r} names {show(row[column])}, which the verbatim map lacks")
            if thought["question"] != row["Question ID"]:
                raise DataError(f"{where}: field {column!r} is an answer to question {thought['question']}, "
                                f"not to the vote's {row['Question ID']}")  # fmt: skip
            answers.append(thought)
        if row["Thought A ID"] == row["Thought B ID"]:
            raise DataError(f"{where}: fields 'Thought A ID' and 'Thought B ID' are the same answer")
        if row["Participant ID"] in (answers[0]["author"], answers[1]["author"]):
            skipped[OWN_ANSWER] += 1
            continue
        chosen = CHOICES[vote]
        pairs.append((number, where, {
            "user_id": row["Participant ID"],
            "question": questions[row["Question ID"]],
            "preferred": answers[chosen]["text"],
            "dispreferred": answers[1 - chosen]["text"],
        }))  # fmt: skip
    return pairs, dict(skipped)
