"""Write the service's stored preference pairs (appended, and collected as feedback) as training data.

    python -m jobs.export_preferences store=~/.local/share/fspo-ray/histories.db out=data/served
    python -m jobs.train model=tiny datasets=[data/served/train.jsonl] eval_datasets=[data/served/test.jsonl] ...

`store` is the service's `store_url` (a SQLite file, or postgresql://...): the store itself is read, so
this needs the database's credentials, not an API key. `out` gets `train.jsonl` and `test.jsonl` in the
canonical schema (user_id, question, preferred, dispreferred), split by user — a user's pairs are all in
one file — by a salted hash of the user id, so a user keeps their side as their history grows.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from omegaconf import MISSING

from fspo_ray.config import ConfigError, parse_overrides, refuse_overwrite, run_job
from fspo_ray.serve.store import open_store


@dataclass
class ExportPreferencesConfig:
    store: str = MISSING  # the service's store_url: a SQLite file (or sqlite:///path) or postgresql://...
    out: str = MISSING  # a folder: train.jsonl and test.jsonl are written there
    test_fraction: float = 0.2  # the share of users (not pairs) written to test.jsonl
    seed: int = 0  # salts the hash that splits users: another seed, another split
    overwrite: bool = False  # replace `out` if it already holds an export


def is_test_user(user_id: str, test_fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < test_fraction


def main(argv: list[str]) -> dict[str, int]:
    cfg = parse_overrides(ExportPreferencesConfig, argv)
    if not 0 <= cfg.test_fraction <= 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {cfg.test_fraction}")
    postgres = cfg.store.startswith(("postgresql://", "postgres://"))
    if not postgres and not os.path.isfile(os.path.expanduser(cfg.store.removeprefix("sqlite://"))):
        raise ConfigError(f"store={cfg.store}: no such SQLite file (the service's store_url)")
    refuse_overwrite(cfg.out, cfg.overwrite)
    store = open_store(cfg.store)
    os.makedirs(cfg.out, exist_ok=True)
    counts = {"train_pairs": 0, "test_pairs": 0, "train_users": 0, "test_users": 0}
    paths = {split: os.path.join(cfg.out, f"{split}.jsonl") for split in ("train", "test")}
    files = {split: open(path, "w", encoding="utf-8") for split, path in paths.items()}
    seen = set()
    with files["train"], files["test"]:
        for user_id, pair in store.all_pairs():
            split = "test" if is_test_user(user_id, cfg.test_fraction, cfg.seed) else "train"
            if user_id not in seen:
                seen.add(user_id)
                counts[f"{split}_users"] += 1
            row = {"user_id": user_id, "question": pair.question, "preferred": pair.preferred,
                   "dispreferred": pair.dispreferred}  # fmt: skip
            files[split].write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[f"{split}_pairs"] += 1
    print(f"wrote {counts['train_pairs']} pairs of {counts['train_users']} users to {paths['train']} and "
          f"{counts['test_pairs']} pairs of {counts['test_users']} users to {paths['test']}")  # fmt: skip
    return counts


if __name__ == "__main__":
    run_job(main)
