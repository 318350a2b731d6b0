"""Train with FSPO: `python -m jobs.train key=value ...`, or the same through `ray job submit`.

    python -m jobs.train model=tiny datasets=[data/synthetic/train.jsonl] loss=sft exp_name=sft
    python -m jobs.train model=tiny datasets=[data/synthetic/train.jsonl] loss=ipo loss.beta=0.05 \
        model.archive=runs/sft/LATEST/policy.pt exp_name=ipo

Joins the cluster at RAY_ADDRESS when set (as under `ray job submit`), else starts a local Ray.
See fspo_ray/train/config.py for every key.
"""

from __future__ import annotations

from fspo_ray.config import run_job
from fspo_ray.train.config import parse_train_config


def main(argv: list[str]):
    import ray

    from fspo_ray.train.run import run_training

    cfg = parse_train_config(argv)
    ray.init(ignore_reinit_error=True)  # honours RAY_ADDRESS
    return run_training(cfg)


if __name__ == "__main__":
    run_job(main)
