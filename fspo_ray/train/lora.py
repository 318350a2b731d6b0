"""LoRA (PEFT) on the policy: only the adapters train, under any ZeRO stage.

The reference is the policy itself with its adapters switched off (no second copy of the weights), or
the scores precomputed before training from the same start model. A run's export is the merged model
(base + adapters, a plain Hugging Face folder that evaluation, serving and vLLM load) with the adapter
folder beside it in `adapter/`.
"""

from __future__ import annotations

import os

import torch

from fspo_ray.train.config import LoraConfig

ADAPTER_DIR = "adapter"  # inside the exported folder


def add_adapters(model, lora: LoraConfig):
    """The model wrapped by PEFT with fresh adapters (B = 0: the policy starts equal to its base)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, config)


class AdaptersDisabled:
    """The reference: the policy's CompletionLogps (logprobs.py) run with its adapters off. It runs outside the
    engine, under no_grad: DeepSpeed counts only the policy's forwards as micro-steps."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, batch):
        with self.policy.lm.disable_adapter():
            return self.policy(batch=batch)


def save_merged(peft_model, state: dict, start_model: str, dtype: torch.dtype, directory: str) -> None:
    """Write the adapters (`directory/adapter/`) and the start model with them merged in (`directory/`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = os.path.join(directory, ADAPTER_DIR)
    peft_model.save_pretrained(adapter_dir, state_dict=state)  # PEFT keeps the adapter tensors only
    base = AutoModelForCausalLM.from_pretrained(start_model, dtype=dtype)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(directory)
