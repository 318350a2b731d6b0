"""Write a synthetic-users data set: train.jsonl, test.jsonl (canonical schema) and users.json.

python -m jobs.synthetic_users out=data/synthetic n_train_users=256 n_test_users=64 pairs_per_user=40
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from omegaconf import MISSING

from fspo_ray.config import parse_overrides, run_job
from fspo_ray.data.synthetic import write_synthetic


@dataclass
class SyntheticUsersConfig:
    out: str = MISSING  # output folder: train.jsonl, test.jsonl, users.json
    n_train_users: int = 256  # users in train.jsonl
    n_test_users: int = 64  # held-out users in test.jsonl
    pairs_per_user: int = 40  # labelled preference pairs per user
    dims_per_user: int = 2  # properties each user cares about
    train_dims_per_user: list[int] | None = None  # training users' property counts, cycled (default: dims_per_user)
    label_noise: float = 0.0  # fraction of pairs whose labels are flipped
    train_label_noise: float | None = None  # the training users' flip rate, where it differs (default: label_noise)
    held_out_combinations: bool = True  # half the held-out users hold pole combinations no training user holds
    seed: int = 0  # seeds users and pairs


def main(argv: list[str]) -> dict[str, str]:
    cfg = asdict(parse_overrides(SyntheticUsersConfig, argv))
    paths = write_synthetic(cfg.pop("out"), **cfg)
    print(" ".join(f"{name}={path}" for name, path in paths.items()))
    return paths


if __name__ == "__main__":
    run_job(main)
