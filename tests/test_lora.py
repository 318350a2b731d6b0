"""LoRA through PEFT under DeepSpeed ZeRO-3 on a local Ray: only adapters train, the reference is the policy
with its adapters off, the export is base + (alpha / r)·B·A, and a resumed run restores the adapters. ZeRO-3
is the hard case (it partitions the frozen weights too); ZeRO-2's export is checked against the same formula on
SmolLM2 in test_smollm2_lora.py."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fspo_ray.data.synthetic import write_synthetic
from fspo_ray.models import TINY
from fspo_ray.scheduling import replica_cpus
from fspo_ray.train.config import parse_train_config
from fspo_ray.train.run import run_training

pytestmark = pytest.mark.slow

R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def users(tmp_path_factory) -> dict[str, str]:
    return write_synthetic(str(tmp_path_factory.mktemp("users")), n_train_users=16, n_test_users=4, pairs_per_user=8)


def lora_ipo(users, storage, *extra):
    return parse_train_config([
        "model=tiny", f"datasets=[{users['train']}]", f"eval_datasets=[{users['test']}]", "shots=1", "passes=1",
        "loss=ipo", "batch_size=4", "n_examples=16", "eval_every=8", "n_eval_examples=8", "eval_batch_size=4",
        "lr=1e-2", "warmup_steps=0", "optimizer=AdamW", "zero_stage=3", f"storage_path={storage}",
        "exp_name=lora", f"lora.r={R}", f"lora.alpha={ALPHA}", "lora.target_modules=[q_proj,v_proj,down_proj]",
        "targets_per_prompt=2",  # and training's shot-set rows (two targets after one shot) under ZeRO-3, end to end
        *extra,
    ])  # fmt: skip


def merged_equals_base_plus_adapters(run_dir: str, base_dir: str, r: int, alpha: float, adapted: int) -> None:
    """The export's weights against the formula, from the adapter file and the start model's weights (in
    float32, the precision training merged in); `adapted`: how many weight matrices have adapters."""
    merged = load_file(os.path.join(run_dir, "LATEST", "model.safetensors"))
    base = {name: w.float() for name, w in load_file(os.path.join(base_dir, "model.safetensors")).items()}
    adapters = load_file(os.path.join(run_dir, "LATEST", "adapter", "adapter_model.safetensors"))
    config = json.load(open(os.path.join(run_dir, "LATEST", "adapter", "adapter_config.json")))
    assert (config["r"], config["lora_alpha"]) == (r, alpha)
    a_keys = sorted(k for k in adapters if ".lora_A." in k)
    assert len(a_keys) == adapted
    changed = set()
    for a_key in a_keys:
        b = adapters[a_key.replace(".lora_A.", ".lora_B.")]
        assert b.abs().max() > 0, f"{a_key}: lora_B never left zero (PEFT #1402)"
        name = a_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        expected = base[name] + (alpha / r) * b @ adapters[a_key]
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
        changed.add(name)
    assert set(merged) == set(base)
    for name in set(merged) - changed:  # everything else is the start model's, untouched by training
        assert torch.equal(merged[name], base[name]), name


def test_lora_ipo_trains_adapters_only_against_the_adapters_off_reference(local_ray, users, tmp_path):
    """ZeRO-3 partitions the frozen weights too: its export gathers them from both workers, then merges on one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fspo_ray.models import resolve_model

    cfg = lora_ipo(users, tmp_path, "precompute_reference=false")  # the reference: adapters off
    run_training(cfg)
    # The next stage's batch-inference replica, sized the moment training returns (its workers are still
    # handing their CPUs back), asks for both of the 2-CPU Ray's CPUs: one would leave a core idle.
    assert replica_cpus(1, on_gpu=False) == 2
    base_dir = resolve_model("tiny")
    # each layer's q_proj, v_proj and down_proj
    merged_equals_base_plus_adapters(cfg.run_dir, base_dir, R, ALPHA, adapted=TINY["num_hidden_layers"] * 3)

    log = [json.loads(line) for line in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    evals = [m for m in log if "rewards_eval/margins" in m]
    assert evals[0]["step"] == 0 and evals[0]["rewards_eval/margins"] == 0.0  # B = 0: policy == reference
    assert abs(evals[-1]["rewards_eval/margins"]) > 1e-3  # the adapters moved the policy off its reference

    # What evaluation, serving and vLLM load (the merged folder) answers as PEFT's base + adapters does.
    ids = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(cfg.run_dir, "LATEST"))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                        os.path.join(cfg.run_dir, "LATEST", "adapter"))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-5)

    # Resuming the finished run restores its adapters from the checkpoint (which holds no frozen weight):
    # the second export equals the first.
    first = load_file(os.path.join(cfg.run_dir, "LATEST", "model.safetensors"))
    checkpoint = sorted(d for d in os.listdir(cfg.run_dir) if d.startswith("step-"))[-1]
    saved = [f for _, _, files in os.walk(os.path.join(cfg.run_dir, checkpoint)) for f in files]
    state = json.load(open(os.path.join(cfg.run_dir, checkpoint, "trainer_state.json")))
    assert state["summary"]["train"]["targets_per_prompt"] == 2 and state["summary"]["train"]["episodes"] == 16 * 4
    assert sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(os.path.join(cfg.run_dir, checkpoint))
               for f in fs if "model_states" in f) < os.path.getsize(os.path.join(base_dir, "model.safetensors")), saved
    run_training(lora_ipo(users, tmp_path, "precompute_reference=false", "resume=must"))
    second = load_file(os.path.join(cfg.run_dir, "LATEST", "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)

