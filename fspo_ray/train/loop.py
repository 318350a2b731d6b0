"""What every Ray Train worker runs: DeepSpeed over the policy (with LoRA adapters when lora.r > 0),
its data shard, and a frozen reference model only where the reference's scores were not precomputed
(reference.py) and no adapters can be switched off (lora.py). The engine wraps the policy's packed forward
(logprobs.CompletionLogps) and every micro-batch goes through it (step.train_step), so accumulation,
offload and every ZeRO stage run DeepSpeed's own paths.

Resume is exact because a rank's shard is the same, in the same order, on every run (pipeline.py): the
checkpoint records the optimizer steps taken, and a resumed rank skips exactly that many steps of its
shard. Weights, optimizer and scheduler come back through DeepSpeed's checkpoint, RNG state per rank.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from fspo_ray.attention import packed_attention
from fspo_ray.logprobs import CompletionLogps
from fspo_ray.models import padding_id, resolve_dtype
from fspo_ray.train.config import TrainConfig
from fspo_ray.train.export import export_hf_folder
from fspo_ray.train.lora import AdaptersDisabled, add_adapters
from fspo_ray.train.metrics import MetricsLog
from fspo_ray.train.step import add_metrics, batch_loss, collate, needs_rejected, train_step

CHECKPOINT_TAG = "deepspeed"


@dataclass(frozen=True)
class LoopPlan:
    cfg: TrainConfig
    start_model: str  # HF folder the policy starts from and the reference stays at
    base_model: str  # the `model=` folder, before any archive: evaluation's "base"
    tokenizer_path: str
    steps_per_epoch: int
    total_steps: int
    has_eval: bool
    summary: dict
    reference_precomputed: bool = False  # the shards carry the reference's scores: no reference model here
    progress: Any = None  # the driver's progress bar queue (console.progress_bar)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning rate at optimizer step `step` (from 0) over the peak: a linear warmup to 1, then 1
    (constant) or a half cosine that reaches 0 at step `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    zero: dict[str, Any] = {"stage": cfg.stage, "stage3_gather_16bit_weights_on_model_save": True}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,  # our client torch.optim optimizer
        "zero_force_ds_cpu_optimizer": False,  # keep it under offload too: DeepSpeed's CPUAdam JIT-compiles
        "steps_per_print": 2**62,
    }


def _load_model(path: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    # An attention that takes the packed rows' masks (logprobs.py): FlexAttention on CUDA, SDPA on CPUs.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=packed_attention(device))
    for module in model.modules():  # the reference trains with dropout disabled
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def start_deepspeed(on_gpu: bool) -> None:
    """DeepSpeed's process group: it adopts the one Ray Train (or a test) set up."""
    import deepspeed

    if not on_gpu:  # DeepSpeed JIT-compiles a shared-memory op on CPUs at init (~2 min) that training never uses
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


@contextlib.contextmanager
def partitioned_loading(ds_config: dict):
    """Under ZeRO-3, while this lasts transformers loads weights partitioned across the ranks (a collective).
    Afterwards a from_pretrained on rank 0 alone (the LoRA export's start model) must be a plain load, not a
    partitioned one that waits for ranks that never join it."""
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    try:
        yield
    finally:
        del hf_ds  # transformers holds it by a weak reference


def policy_engine(
    cfg: TrainConfig, start_model: str, total_steps: int, dtype: torch.dtype, ds_config: dict, device: torch.device
):
    """(engine, scheduler): the policy (with LoRA adapters when lora.r > 0) in a CompletionLogps, under
    DeepSpeed with its optimizer and learning-rate schedule."""
    import deepspeed

    policy = _load_model(start_model, dtype, device)
    if cfg.activation_checkpointing:
        policy.gradient_checkpointing_enable()
    if cfg.lora.r:
        policy = add_adapters(policy, cfg.lora)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = getattr(torch.optim, cfg.optimizer)(trainable, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.lr_schedule)
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=CompletionLogps(policy), optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    return engine, scheduler


def reference_scorer(cfg: TrainConfig, start_model: str, engine, ds_config: dict, device: torch.device):
    """The frozen reference, called as `reference(batch=...)`: the policy with its adapters off (LoRA), else
    the start model (sharded with the policy under ZeRO-3)."""
    import deepspeed

    if cfg.lora.r:
        return AdaptersDisabled(engine.module)
    dtype = getattr(torch, resolve_dtype(cfg.model.reference_dtype, device.type == "cuda"))
    reference = CompletionLogps(_load_model(start_model, dtype, device).eval().requires_grad_(False))
    if cfg.stage == 3:  # shard the frozen reference too
        ref_config = {k: ds_config[k] for k in ("train_micro_batch_size_per_gpu", "bf16", "fp16")}
        ref_config["zero_optimization"] = {"stage": 3}
        return deepspeed.initialize(model=reference, config=ref_config)[0]
    return reference.to(device)


def _batches(shard, micro_batch: int, skip: int):
    """The shard's micro-batches in its fixed order, the first `skip` left out."""
    for i, batch in enumerate(shard.iter_batches(batch_size=micro_batch, batch_format="numpy", drop_last=True)):
        if i >= skip:
            yield batch


def train_loop(plan: LoopPlan) -> None:
    import ray.data
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    from transformers import AutoTokenizer

    cfg = plan.cfg
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    start_deepspeed(on_gpu)
    torch.manual_seed(cfg.seed + rank)

    policy_dtype = getattr(torch, resolve_dtype(cfg.model.policy_dtype, on_gpu))
    ds_config = deepspeed_config(cfg, policy_dtype)
    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_path)
    pad_id = padding_id(tokenizer)
    reference = None
    with partitioned_loading(ds_config):
        engine, scheduler = policy_engine(cfg, plan.start_model, plan.total_steps, policy_dtype, ds_config, device)
        if cfg.loss.name != "sft" and not plan.reference_precomputed:
            reference = reference_scorer(cfg, plan.start_model, engine, ds_config, device)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            # A LoRA checkpoint holds the adapters only: the frozen weights are the start model's.
            engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=not cfg.lora.r)
            with open(os.path.join(directory, "trainer_state.json")) as f:
                step = json.load(f)["step"]
            rng = os.path.join(directory, f"rng_rank{rank}.pt")
            if os.path.exists(rng):
                torch.set_rng_state(torch.load(rng, weights_only=True))
    log = MetricsLog(cfg, rank, resume_step=step, progress=plan.progress)

    with_rejected = needs_rejected(cfg.loss.name, cfg.sft_target)
    train_shard = ray.train.get_dataset_shard(f"train_{rank}")
    eval_shard = ray.train.get_dataset_shard(f"eval_{rank}") if plan.has_eval else None

    def evaluate() -> dict[str, float]:
        engine.eval()
        totals: dict[str, list] = {}
        with torch.no_grad():
            for rows in eval_shard.iter_batches(batch_size=cfg.eval_batch_size // world, batch_format="numpy"):
                batch = collate(rows, pad_id, device, with_rejected=with_rejected)
                _, metrics = batch_loss(engine, reference, batch, cfg.loss, cfg.sft_target, "eval")
                add_metrics(totals, metrics)
        engine.train()
        return _all_reduce(totals, device)

    def save(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, exclude_frozen_parameters=bool(cfg.lora.r))
            torch.save(torch.get_rng_state(), os.path.join(directory, f"rng_rank{rank}.pt"))
            with open(os.path.join(directory, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "examples": step * cfg.batch_size, "summary": plan.summary}, f)
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"step-{step * cfg.batch_size}",
            )

    engine.train()
    if cfg.do_first_eval and plan.has_eval and step == 0:
        log.write(0, evaluate())
    batches, epoch = None, -1
    while step < plan.total_steps:
        if step // plan.steps_per_epoch != epoch:
            epoch = step // plan.steps_per_epoch
            skip = (step % plan.steps_per_epoch) * cfg.gradient_accumulation_steps
            batches = _batches(train_shard, cfg.micro_batch_size, skip)
        started = time.perf_counter()
        rows = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
        ids = [str(i) for micro in rows for i in micro["episode_id"]]
        micro_batches = [collate(micro, pad_id, device, with_rejected=with_rejected) for micro in rows]
        tokens = sum(batch.packed.tokens for batch in micro_batches)
        padding = sum(batch.packed.padding for batch in micro_batches)
        totals, grad_norm = train_step(engine, reference, micro_batches, cfg.loss, cfg.sft_target)
        step += 1
        examples = step * cfg.batch_size
        # Every rank all-reduces every step: a collective must never depend on one rank's clock.
        elapsed = torch.tensor([tokens, time.perf_counter() - started, padding], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(elapsed)
        metrics = _all_reduce(totals, device)
        metrics.update(
            {
                "grad_norm": grad_norm,
                "lr": scheduler.get_last_lr()[0],
                # summed over ranks: tokens of all ranks over the ranks' mean step time
                "examples_per_second": cfg.batch_size / float(elapsed[1] / world),
                "tokens_per_second": float(elapsed[0] / (elapsed[1] / world)),
                "padding_fraction": float(elapsed[2] / (elapsed[0] + elapsed[2])),
                "counters/examples": examples,
                "counters/updates": step,
            }
        )
        log.example_ids(step, ids)
        log.write(step, metrics, progress=f"epoch {epoch} step {step}/{plan.total_steps}")
        crossed_eval = examples // cfg.eval_every != (examples - cfg.batch_size) // cfg.eval_every
        if (crossed_eval or step == plan.total_steps) and not cfg.debug:
            metrics = evaluate() if plan.has_eval else {}
            log.write(step, metrics)
            save({"step": step, "examples": examples, **metrics})
    if not cfg.debug:
        run_info = {"reference": plan.start_model, "base_model": plan.base_model, "loss": cfg.loss.name,
                    "beta": cfg.loss.beta, "shots": plan.summary["train"]["shots"],
                    "description_mode": cfg.description_mode, "preferred_only": cfg.preferred_only,
                    "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}  # fmt: skip
        export_hf_folder(engine, tokenizer, cfg, rank, run_info, plan.start_model, policy_dtype)
    log.close()


def _all_reduce(totals: dict[str, list], device: torch.device) -> dict[str, float]:
    """Means over all ranks: all-reduce each metric's (sum, count)."""
    if not totals:
        return {}
    keys = sorted(totals)
    packed = torch.tensor([[totals[k][0], totals[k][1]] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(packed)
    return {k: float(packed[i, 0] / packed[i, 1]) for i, k in enumerate(keys)}
