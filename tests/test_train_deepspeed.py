"""DeepSpeed in this process, as a world of one (gloo), built and stepped by the functions a Ray Train worker
runs (loop.py, step.py): the accumulation and reference paths are DeepSpeed's whatever the world size.

Gradient accumulation is exact under every ZeRO stage: one optimizer step over two micro-batches of 4
exports the weights one step over the same 8 episodes in one batch exports. ZeRO-3 advances its
micro-step, which makes it add a micro-batch's gradient to the last one's instead of overwriting it, in
the engine's forward: a step that called the model's submodules directly exported the update of the last
micro-batch alone (82% off here). And the reference computed beside the policy is the start model, under
ZeRO-3 too (sharded with the policy, or the policy with its LoRA adapters off).
"""

import os

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from fspo_ray.logprobs import pack, packed_logps
from fspo_ray.models import resolve_model
from fspo_ray.train.config import parse_train_config
from fspo_ray.train.export import export_hf_folder
from fspo_ray.train.loop import deepspeed_config, partitioned_loading, policy_engine, reference_scorer, start_deepspeed
from fspo_ray.train.step import collate, train_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world_of_one():
    port = free_port()
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    start_deepspeed(on_gpu=False)
    yield
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _episodes(n=8, seed=0) -> dict[str, list]:
    """Token rows of different lengths: micro-batches whose gradients differ."""
    rng = torch.Generator().manual_seed(seed)
    ids = lambda low, high: [torch.randint(1, 500, (int(torch.randint(low, high, (1,), generator=rng)),),  # noqa: E731
                                           generator=rng).tolist() for _ in range(n)]  # fmt: skip
    return {"prompt_ids": ids(5, 40), "chosen_ids": ids(2, 10), "rejected_ids": ids(2, 10)}


def exported_update(storage, stage: int, offload: bool, accumulation: int) -> dict[str, torch.Tensor]:
    """The exported weights minus the start model's after one SGD step (no clipping) on the 8 episodes."""
    from transformers import AutoTokenizer

    start = resolve_model("tiny")
    cfg = parse_train_config([
        "datasets=[unused]", "loss=sft", "sft_target=both", "batch_size=8", "num_workers=1",
        f"gradient_accumulation_steps={accumulation}", f"zero_stage={stage}", f"offload_optimizer={offload}",
        "optimizer=SGD", "lr=0.5", "warmup_steps=0", "max_grad_norm=0", f"storage_path={storage}",
        f"exp_name=zero{stage}-offload{int(offload)}-gas{accumulation}",
    ])  # fmt: skip
    ds_config = deepspeed_config(cfg, torch.float32)
    with partitioned_loading(ds_config):
        engine, _ = policy_engine(cfg, start, 1, torch.float32, ds_config, torch.device("cpu"))
    episodes, size = _episodes(), cfg.micro_batch_size
    micro_batches = [collate({c: rows[k * size : (k + 1) * size] for c, rows in episodes.items()}, 0, "cpu",
                             with_rejected=True) for k in range(accumulation)]  # fmt: skip
    train_step(engine, None, micro_batches, cfg.loss, cfg.sft_target)
    export_hf_folder(engine, AutoTokenizer.from_pretrained(start), cfg, 0, {}, start, torch.float32)
    exported = load_file(os.path.join(cfg.run_dir, "LATEST", "model.safetensors"))
    before = load_file(os.path.join(start, "model.safetensors"))
    return {name: exported[name] - before[name] for name in before}


@pytest.mark.parametrize("stage, offload", [(0, False), (2, False), (2, True), (3, False), (3, True)])
def test_two_micro_batches_update_the_weights_as_one_batch_does(world_of_one, tmp_path, stage, offload):
    whole = exported_update(tmp_path, stage, offload, accumulation=1)
    accumulated = exported_update(tmp_path, stage, offload, accumulation=2)
    norm = sum(float(d.square().sum()) for d in whole.values()) ** 0.5
    off = sum(float((accumulated[k] - d).square().sum()) for k, d in whole.items()) ** 0.5
    assert norm > 1e-3, "the step did not move the weights"
    assert off / norm < 1e-4, f"ZeRO-{stage} offload={offload}: the accumulated update is {off / norm:.1%} off"


@pytest.mark.parametrize("lora", [0, 4])
def test_the_reference_beside_the_policy_is_the_start_model_under_zero_3(world_of_one, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    start = resolve_model("tiny")
    cfg = parse_train_config(["datasets=[unused]", "loss=ipo", "precompute_reference=false", "batch_size=8",
                              "num_workers=1", "zero_stage=3", "optimizer=SGD", "lr=0.5", "warmup_steps=0",
                              f"lora.r={lora}", f"storage_path={tmp_path}"])  # fmt: skip
    ds_config = deepspeed_config(cfg, torch.float32)
    with partitioned_loading(ds_config):
        engine, _ = policy_engine(cfg, start, 1, torch.float32, ds_config, torch.device("cpu"))
        reference = reference_scorer(cfg, start, engine, ds_config, torch.device("cpu"))
    episodes = _episodes()
    train_step(engine, reference, [collate(episodes, 0, "cpu", with_rejected=True)], cfg.loss, cfg.sft_target)
    batch = pack(*(episodes[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")), 0)
    with torch.no_grad():
        expected = packed_logps(AutoModelForCausalLM.from_pretrained(start, attn_implementation="sdpa"), batch)
        torch.testing.assert_close(reference(batch=batch), expected, rtol=1e-5, atol=0)
        assert not torch.allclose(engine(batch=batch), expected, rtol=1e-3, atol=0)  # the policy did move
