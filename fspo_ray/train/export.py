"""The trained policy as a Hugging Face folder at `<run>/LATEST/`, loadable by `from_pretrained`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from fspo_ray.data.tokenize import PromptStyle
from fspo_ray.train.config import TrainConfig
from fspo_ray.train.lora import save_merged


def publish(local_dir: str, destination: str) -> None:
    """Copy a folder to a local path (replacing it whole) or to a URI such as s3://bucket/run/LATEST."""
    if "://" in destination:
        import pyarrow.fs

        pyarrow.fs.copy_files(local_dir, destination)
        return
    staging = f"{destination}.tmp-{os.getpid()}"
    shutil.copytree(local_dir, staging)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)


RUN_INFO = "fspo_run.json"  # beside the weights: what evaluation and serving need to know about the run


def read_run_info(model_dir: str) -> dict:
    """The run's fspo_run.json (reference, base model, beta, prompt style), or {} for a plain HF folder."""
    path = os.path.join(model_dir, RUN_INFO)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_prompt_style(info: dict) -> PromptStyle:
    """The prompt style a run was trained with, from its fspo_run.json (the default for a plain folder)."""
    return PromptStyle(bool(info.get("preferred_only", False)), info.get("description_mode", "none"))


def export_hf_folder(engine, tokenizer, cfg: TrainConfig, rank: int, run_info: dict, start_model: str,
                     dtype: torch.dtype) -> None:
    """Every rank must call this: under ZeRO-3 the weights are gathered from all of them. A LoRA run
    exports the start model with its adapters merged in, and the adapters in `adapter/` (lora.py)."""
    if cfg.stage == 3:
        # The same consolidation accelerate and the HF Trainer use; rank 0 receives the full weights.
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as directory:
        if cfg.lora.r:
            save_merged(engine.module, state, start_model, dtype, directory)
        else:
            engine.module.save_pretrained(directory, state_dict=state)
        tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, RUN_INFO), "w") as f:
            json.dump(run_info, f, indent=1)
        publish(directory, f"{cfg.run_dir}/LATEST")
