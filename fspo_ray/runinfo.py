"""What a trained model's folder says about its run: `fspo_run.json`, beside the weights.

Training writes it into every export; evaluation and serving read it to build exactly the prompts the
model was trained on (its prompt style and length limits) and to find its reference and base model.
A plain Hugging Face folder has none: readers then get {} and use their documented defaults.
"""

from __future__ import annotations

import json
import os

RUN_INFO = "fspo_run.json"


def read_run_info(model_dir: str) -> dict:
    """The run's fspo_run.json (reference, base model, beta, prompt style, length limits), or {}."""
    path = os.path.join(model_dir, RUN_INFO)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_run_info(model_dir: str, info: dict) -> None:
    with open(os.path.join(model_dir, RUN_INFO), "w") as f:
        json.dump(info, f, indent=1)
