"""Readers for the preference data users already have, normalized to one `PreferencePair`.

A data set is named by a spec, `[format:]path`:

    roleplay:/data/roleplay.parquet     elix:/data/elix_train.jsonl    review_8shot:/data/reviews/
    dpo_json:/data/sampled.json         canonical:/data/mine.jsonl     /data/mine.jsonl (inferred)
    global_dialogues:/data/GD6UK/       (a vote-log folder: fspo_ray/data/votes.py)

Containers: JSONL (`.jsonl`), Parquet (`.parquet`), a directory written by `datasets`' `save_to_disk`
(a Dataset, or a DatasetDict with `split=`), and for `dpo_json` the DPO codebase's single JSON object.
Without a format prefix the format is inferred from the first row's columns (elix and review share
columns; name `review_4shot`/`review_8shot` explicitly).

Every text is stripped of surrounding whitespace, as the reference does. A malformed row raises
`DataError` naming the file, the row and the field; nothing is skipped, except where a format's rows hold
no preference (a vote log's "I'm not sure"): those are counted (`skipped_rows`) and reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from fspo_ray.config import InputError

# Default shots per episode for each format (fspo-method.md §1.1); user-less data has no context.
DEFAULT_SHOTS = {"roleplay": 8, "elix": 4, "review_4shot": 4, "review_8shot": 8, "dpo_json": 0, "canonical": 4,
                 "global_dialogues": 8}
FORMATS = tuple(DEFAULT_SHOTS)

# A pair's position in its data set, packed into one int for deterministic ordering: file, then row.
_ROW_BITS = 40


class DataError(InputError):
    """Bad input data; the message names the file, the row and the field."""


@dataclass(frozen=True)
class PreferencePair:
    """One labelled preference of one user. `user_id` is None for user-less (non-few-shot) data."""

    user_id: str | None
    question: str
    preferred: str
    dispreferred: str
    user_description: str | None = None
    # The persona the dispreferred answer was written for; needed by generated rationalizations.
    dispreferred_description: str | None = None
    source: str = ""  # "file row N", for error messages downstream
    order: int = 0  # position in the data set, the tie-breaker that makes shuffles reproducible

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DataSpec:
    format: str | None
    path: str

    @classmethod
    def parse(cls, spec: str) -> DataSpec:
        head, sep, tail = spec.partition(":")
        if sep and head in FORMATS:
            return cls(head, tail)
        if sep and head and "/" not in head and not os.path.exists(spec) and not tail.startswith("//"):
            raise DataError(f"unknown data format {head!r} in {spec!r}; known formats: {', '.join(FORMATS)}")
        return cls(None, spec)


def _field(row: dict, field: str) -> Any:
    if row.get(field) is not None:
        return row[field]
    value: Any = row  # "score_persona.persona_description" may arrive nested rather than flat
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _text(row: dict, field: str, where: str, *, optional: bool = False) -> str | None:
    value = _field(row, field)
    if value is None and optional:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and field in ("user_id", "level", "scorer_level"):
        value = str(value)  # numeric user ids are ids all the same
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {show(value)}")
    value = value.strip()
    if not value:
        if optional:
            return None
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def review_description(key: str) -> str:
    """`positive+concise` -> "This user prefers positive and concise reviews." """
    return f"This user prefers {' and '.join(part.strip() for part in key.split('+'))} reviews."


def elix_description(level: str) -> str:
    return f"The user is {level}."


def _roleplay(row: dict, where: str) -> dict:
    return dict(
        user_id=_text(row, "level", where),
        question=_text(row, "x", where),
        preferred=_text(row, "yw", where),
        dispreferred=_text(row, "yl", where),
        user_description=_text(row, "score_persona.persona_description", where),
    )


def _scored_pair(describe: Callable[[str], str]) -> Callable[[dict, str], dict]:
    def normalize(row: dict, where: str) -> dict:
        label = row.get("label")
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if label not in (0, 1) or isinstance(label, bool):
            raise DataError(f"{where}: field 'label' must be 0 (response_x preferred) or 1, got {show(label)}")
        x, y = _text(row, "response_x", where), _text(row, "response_y", where)
        level_x, level_y = _text(row, "level_x", where, optional=True), _text(row, "level_y", where, optional=True)
        losing_level = level_y if label == 0 else level_x
        return dict(
            user_id=_text(row, "scorer_level", where),
            question=_text(row, "prompt", where),
            preferred=x if label == 0 else y,
            dispreferred=y if label == 0 else x,
            user_description=describe(_text(row, "scorer_level", where)),
            dispreferred_description=describe(losing_level) if losing_level else None,
        )

    return normalize


def _canonical(row: dict, where: str) -> dict:
    return dict(
        user_id=_text(row, "user_id", where),
        question=_text(row, "question", where),
        preferred=_text(row, "preferred", where),
        dispreferred=_text(row, "dispreferred", where),
        user_description=_text(row, "user_description", where, optional=True),
        dispreferred_description=_text(row, "dispreferred_description", where, optional=True),
    )


_NORMALIZERS: dict[str, Callable[[dict, str], dict]] = {
    "roleplay": _roleplay,
    "elix": _scored_pair(elix_description),
    "review_4shot": _scored_pair(review_description),
    "review_8shot": _scored_pair(review_description),
    "canonical": _canonical,
}


def infer_format(row: dict, where: str) -> str:
    columns = set(row)
    if {"x", "yw", "yl"} <= columns:
        return "roleplay"
    if {"response_x", "response_y", "label"} <= columns:
        return "elix"
    if {"question", "preferred", "dispreferred"} <= columns:
        return "canonical"
    raise DataError(
        f"{where}: cannot tell the data format from columns {sorted(columns)}; "
        f"prefix the path with one of {', '.join(FORMATS)}"
    )


def raw_rows(path: str, split: str | None) -> Iterator[tuple[int, dict]]:
    """(1-based row number, raw row) of a JSONL file, Parquet file or `save_to_disk` directory."""
    if os.path.isdir(path):
        import datasets  # only needed for save_to_disk folders

        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split is None or split not in loaded:
                raise DataError(f"{path}: holds splits {sorted(loaded)}; choose one with split=NAME")
            loaded = loaded[split]
        elif split is not None:
            raise DataError(f"{path}: holds a single data set, not splits; drop split={split}")
        number = 0
        for batch in loaded.with_format("arrow").iter(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
        return
    if split is not None:
        raise DataError(f"{path}: split={split} applies to save_to_disk folders only")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
        return
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a blank line holds no row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} row {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} row {number}: expected a JSON object, got {show(row)}")
            yield number, row


def _dpo_json_rows(path: str) -> Iterator[tuple[str, dict]]:
    """The DPO codebase's `{prompt: {responses, pairs, sft_target}}`: one pair per entry of `pairs`.

    `sft_target` is validated but unused: our SFT trains on each pair's preferred response.
    """
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping prompts to {{responses, pairs, sft_target}}")
    for number, (prompt, entry) in enumerate(data.items(), start=1):
        where = f"{path} prompt #{number} ({show(prompt)})"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object with responses and pairs, got {show(entry)}")
        responses, pairs = entry.get("responses"), entry.get("pairs")
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DataError(f"{where}: field 'responses' must be a list of strings, got {show(responses)}")
        if not isinstance(pairs, list):
            raise DataError(f"{where}: field 'pairs' must be a list of [preferred, dispreferred], got {show(pairs)}")
        if "sft_target" in entry and not isinstance(entry["sft_target"], str):
            raise DataError(f"{where}: field 'sft_target' must be a string, got {show(entry['sft_target'])}")
        for k, pair in enumerate(pairs):
            ok = isinstance(pair, list) and len(pair) == 2
            ok = ok and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(responses) for i in pair)
            if not ok or pair[0] == pair[1]:
                raise DataError(
                    f"{where}: pairs[{k}] must be two different indices into {len(responses)} responses, "
                    f"got {show(pair)}"
                )
            yield (
                f"{where} pairs[{k}]",
                {
                    "question": prompt,
                    "preferred": responses[pair[0]],
                    "dispreferred": responses[pair[1]],
                },
            )


def resolve_format(spec: str, split: str | None = None) -> str:
    """The spec's format: its prefix, `dpo_json` for a `.json` file, else inferred from the first row."""
    parsed = DataSpec.parse(spec)
    if not os.path.exists(parsed.path):
        raise DataError(f"{parsed.path}: no such file or directory")
    if parsed.format:
        return parsed.format
    if parsed.path.endswith(".json"):
        return "dpo_json"
    from fspo_ray.data.votes import is_vote_log  # votes.py builds on this module

    if is_vote_log(parsed.path):
        return "global_dialogues"
    first = next(raw_rows(parsed.path, split), None)
    if first is None:
        raise DataError(f"{parsed.path}: holds no rows")
    return infer_format(first[1], f"{parsed.path} row {first[0]}")


def read_pairs(
    spec: str, *, split: str | None = None, users: Iterable[str] | None = None, file_index: int = 0
) -> Iterator[PreferencePair]:
    """Stream a data set's pairs in file order, optionally keeping only some users."""
    fmt, path = resolve_format(spec, split), DataSpec.parse(spec).path
    keep = {str(u) for u in users} if users is not None else None
    if fmt == "dpo_json":
        if split is not None:
            raise DataError(f"{path}: DPO-codebase JSON has no splits; drop split={split}")
        if keep is not None:
            raise DataError(f"{path}: DPO-codebase JSON has no user ids, so a user filter cannot apply")
        for number, (where, row) in enumerate(_dpo_json_rows(path)):
            fields = {k: _text(row, k, where) for k in ("question", "preferred", "dispreferred")}
            yield PreferencePair(user_id=None, **fields, source=where, order=(file_index << _ROW_BITS) | number)
        return
    if fmt == "global_dialogues":
        from fspo_ray.data.votes import read_vote_log

        if split is not None:
            raise DataError(f"{path}: a vote-log folder has no splits; drop split={split}")
        for number, where, fields in read_vote_log(path)[0]:
            if keep is None or fields["user_id"] in keep:
                yield PreferencePair(**fields, source=where, order=(file_index << _ROW_BITS) | number)
        return
    normalize = _NORMALIZERS[fmt]
    for number, row in raw_rows(path, split):
        where = f"{path} row {number}"
        fields = normalize(row, where)
        if keep is None or fields["user_id"] in keep:
            yield PreferencePair(**fields, source=where, order=(file_index << _ROW_BITS) | number)


def read_pair_dataset(specs: list[str], split: str | None):
    """A Ray Dataset of every pair of `specs` (`PreferencePair.as_row()` rows), one read task per file."""
    import ray.data

    def read_file(item: dict) -> Iterator[dict]:
        for pair in read_pairs(item["spec"], split=split, file_index=item["file_index"]):
            yield pair.as_row()

    for spec in specs:
        resolve_format(spec, split)  # fail here, with the reader's message, rather than inside a task
    items = [{"spec": spec, "file_index": i} for i, spec in enumerate(specs)]
    return ray.data.from_items(items, override_num_blocks=len(items)).flat_map(read_file)


def skipped_rows(specs: list[str], split: str | None = None) -> dict[str, int]:
    """{why: rows} that the data sets hold but that are no preference pair (only vote logs have such rows)."""
    from fspo_ray.data.votes import read_vote_log

    total: dict[str, int] = {}
    for spec in specs:
        if resolve_format(spec, split) == "global_dialogues":
            for why, n in read_vote_log(DataSpec.parse(spec).path)[1].items():
                total[why] = total.get(why, 0) + n
    return total


def default_shots(spec: str, split: str | None = None) -> int:
    """The shots the reference uses for this data set's format (fspo-method.md §1.1)."""
    return DEFAULT_SHOTS[resolve_format(spec, split)]
