"""The trained policy as a Hugging Face folder at `<run>/LATEST/`, loadable by `from_pretrained`."""

from __future__ import annotations

import tempfile

import torch

from fspo_ray.files import publish_folder
from fspo_ray.runinfo import write_run_info
from fspo_ray.train.config import TrainConfig
from fspo_ray.train.lora import save_merged


def export_hf_folder(engine, tokenizer, cfg: TrainConfig, rank: int, run_info: dict, start_model: str,
                     dtype: torch.dtype) -> None:
    """Every rank must call this: under ZeRO-3 the weights are gathered from all of them. A LoRA run
    exports the start model with its adapters merged in, and the adapters in `adapter/` (lora.py)."""
    lm = engine.module.lm  # the Hugging Face (or PEFT) model inside the CompletionLogps DeepSpeed wraps
    if cfg.stage == 3:
        # The same consolidation accelerate and the HF Trainer use; rank 0 receives the full weights, named
        # from the wrapper down ("lm.").
        state = engine._zero3_consolidated_16bit_state_dict()
        state = {name.removeprefix("lm."): tensor for name, tensor in state.items()} if rank == 0 else None
    else:
        state = lm.state_dict() if rank == 0 else None
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as directory:
        if cfg.lora.r:
            save_merged(lm, state, start_model, dtype, directory)
        else:
            lm.save_pretrained(directory, state_dict=state)
        tokenizer.save_pretrained(directory)
        write_run_info(directory, run_info)
        publish_folder(directory, f"{cfg.run_dir}/LATEST")
