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
    out: str = MISSING
    n_train_users: int = 256
    n_test_users: int = 64
    pairs_per_user: int = 40
    dims_per_user: int = 2
    label_noise: float = 0.0
    seed: int = 0


def main(argv: list[str]) -> dict[str, str]:
    cfg = asdict(parse_overrides(SyntheticUsersConfig, argv))
    paths = write_synthetic(cfg.pop("out"), **cfg)
    print(" ".join(f"{name}={path}" for name, path in paths.items()))
    return paths


if __name__ == "__main__":
    run_job(main)
