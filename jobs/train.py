"""Train with FSPO: `python -m jobs.train key=value ...`, or the same through `ray job submit`.

    python -m jobs.train model=tiny datasets=[data/synthetic/train.jsonl] loss=sft exp_name=sft
    python -m jobs.train model=tiny datasets=[data/synthetic/train.jsonl] loss=ipo loss.beta=0.05 \
        model.archive=runs/sft/LATEST/policy.pt exp_name=ipo

Joins the cluster at RAY_ADDRESS when set (as under `ray job submit`), else starts a local Ray.
See fspo_ray/train/config.py for every key.
"""

from __future__ import annotations

import os

from fspo_ray.config import run_job
from fspo_ray.train.config import parse_train_config


def main(argv: list[str]):
    from fspo_ray.console import job_console
    from fspo_ray.train.run import run_training

    cfg = parse_train_config(argv)
    log = os.path.join(os.path.dirname(cfg.local_dir), f"{cfg.exp_name}.log")  # beside the run: its folder is Ray's
    print(f"[{cfg.exp_name}] Ray's and the libraries' output goes to {log}", flush=True)
    with job_console(log, cfg.verbose):
        return run_training(cfg)


if __name__ == "__main__":
    run_job(main)
