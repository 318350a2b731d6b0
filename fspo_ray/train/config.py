"""The training config: the DPO codebase's keys (so its command lines work) plus ours.

    python -m jobs.train model=tiny datasets=[data/train.jsonl] loss=ipo loss.beta=0.05 \
        model.archive=runs/sft/LATEST/policy.pt batch_size=8 num_workers=2 zero_stage=2

`model=X` and `loss=X` are the seed's Hydra group choices: they set `model.name_or_path` and `loss.name`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fspo_ray.config import ConfigError, parse_overrides

# The seed's `trainer=` choices, mapped to a DeepSpeed ZeRO stage across Ray Train workers.
TRAINER_ZERO_STAGE = {
    "BasicTrainer": 0,  # plain data parallel
    "FSDPTrainer": 3,  # FSDP full sharding == ZeRO-3
    "TensorParallelTrainer": 3,  # DeepSpeed training has no tensor parallelism; ZeRO-3 shards instead
}

# The reference scores' cache, shared by the runs under one storage_path (train/reference.py).
REFERENCE_CACHE = "reference_logps"

# Keys of the seed's config that have no effect here, and why (accepted so its command lines run).
IGNORED_SEED_KEYS = {
    "sample_during_eval": "sampling during evaluation is the evaluation job's work (jobs.evaluate)",
    "n_eval_model_samples": "sampling during evaluation is the evaluation job's work (jobs.evaluate)",
    "local_dirs": "runs go to storage_path (a local path or a URI)",
    "local_run_dir": "runs go to storage_path/exp_name",
    "fsdp_port": "Ray Train sets up the process group",
    "model.block_name": "DeepSpeed ZeRO shards parameters without wrapping blocks",
    "model.fsdp_policy_mp": "mixed precision is set by model.policy_dtype",
}


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # a preset (tiny) or a local Hugging Face model folder
    tokenizer_name_or_path: str | None = None  # default: the model's own
    archive: str | None = None  # start from (and reference to) these weights: run folder, HF folder, policy.pt
    policy_dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    reference_dtype: str = "auto"  # auto: like policy_dtype
    block_name: str | None = None  # seed key, no effect
    fsdp_policy_mp: str | None = None  # seed key, no effect


@dataclass
class LossConfig:
    name: str = "sft"  # sft | dpo | ipo
    beta: float = 0.1  # dpo/ipo strength of the pull toward the reference
    label_smoothing: float = 0.0  # dpo only: conservative DPO
    reference_free: bool = False  # dpo only: no reference model (margins against 0)
    sft_weight: float = 0.0  # dpo/ipo: adds this times the preferred answer's NLL (RPO); 0 as in the paper


LLAMA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    r: int = 0  # adapter rank; 0: no LoRA, every weight trains
    alpha: float = 16.0  # adapters add (alpha / r) · B·A to each targeted weight
    dropout: float = 0.0  # dropout on the adapters' input while training
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_LAYERS))  # layers that get adapters


@dataclass
class WandbConfig:
    enabled: bool = False  # also needs WANDB_API_KEY; never required
    entity: str | None = None  # wandb entity (team or user)
    project: str = "fspo-ray"  # wandb project


@dataclass
class TrainConfig:
    # --- the DPO codebase's keys ---
    seed: int = 0  # seeds data order, shuffles and initialization
    exp_name: str = "fspo"  # the run's folder under storage_path; re-running it resumes (see resume)
    datasets: list[str] = field(default_factory=list)  # [format:]path, see fspo_ray/data/readers.py
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainer: str = "BasicTrainer"  # BasicTrainer (ZeRO-0) | FSDPTrainer | TensorParallelTrainer (ZeRO-3)
    lr: float = 5e-7  # peak learning rate (linear warmup, then lr_schedule)
    lr_schedule: str = "constant"  # after warmup: constant (the DPO codebase's) | cosine (down to 0 at the last step)
    n_epochs: int | None = 1  # passes over the training episodes (ignored when n_examples is set)
    n_examples: int | None = None  # if set, train on this many examples instead of n_epochs
    batch_size: int = 4  # examples per optimizer step, across all workers
    eval_batch_size: int = 16  # examples per evaluation forward, across all workers
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_length: int = 512  # prompt + completion tokens; longer episodes drop their oldest shots
    max_prompt_length: int = 256  # prompt tokens; longer prompts drop their oldest shots
    warmup_steps: int = 150  # optimizer steps of linear learning-rate warmup
    max_grad_norm: float = 10.0  # gradient clipping norm
    optimizer: str = "RMSprop"  # RMSprop | AdamW | Adam | SGD (torch.optim, PyTorch defaults)
    eval_every: int = 20_000  # examples between evaluations and checkpoints
    n_eval_examples: int = 256  # held-out episodes per evaluation
    do_first_eval: bool = True  # evaluate before the first step
    minimum_log_interval_secs: float = 1.0  # least time between two console metric lines
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    debug: bool = False  # no checkpoints, no exports
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sample_during_eval: bool = False  # seed key, no effect
    n_eval_model_samples: int = 16  # seed key, no effect
    local_dirs: list[str] = field(default_factory=list)  # seed key, no effect
    local_run_dir: str | None = None  # seed key, no effect
    fsdp_port: int | None = None  # seed key, no effect
    # --- ours: data ---
    eval_datasets: list[str] = field(default_factory=list)  # held-out users' data; none: no evaluation
    data_split: str | None = None  # split of save_to_disk DatasetDicts in `datasets`
    eval_split: str | None = None  # split of save_to_disk DatasetDicts in `eval_datasets`
    shots: int | None = None  # default: the first data set's format's
    min_shots: int | None = None  # training windows draw their shot count from min_shots..shots; default: all N
    passes: int | None = None  # default: ⌈2(N+K)/K⌉, 2(N+1) at K=1 (1 for 0 shots); evaluation always 1
    targets_per_prompt: int = 1  # K: episodes sharing one window of shots, scored in one packed row (a speed knob)
    sft_target: str = "chosen"  # chosen (the paper) | both (the released code)
    description_mode: str = "none"  # none | generated | teacher_forced
    preferred_only: bool = False  # shots show the preferred answer only (the reference's preferred-only prompt)
    length_window: int = 64  # order episodes by length inside seeded windows of this many (less padding); 0: off
    # --- ours: reference ---
    precompute_reference: bool = True  # dpo/ipo: score the reference in one pass before training; else every step
    reference_concurrency: int = 1  # reference-scoring replicas (one GPU each on a GPU cluster)
    # --- ours: cluster ---
    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    use_gpu: bool | None = None  # default: when the cluster has GPUs
    cpus_per_worker: float | None = None  # default: 1 with GPUs, 0.5 on CPUs (leaves CPUs to Ray Data)
    gpus_per_worker: float = 1.0  # on a GPU cluster
    placement_strategy: str = "PACK"  # workers' placement: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (one a node)
    zero_stage: int | None = None  # default: from trainer
    offload_optimizer: bool = False  # ZeRO-1..3: offload of optimizer state to CPU memory
    offload_params: bool = False  # ZeRO-3 only
    storage_path: str = "runs"  # local path (made absolute) or URI (s3://, gs://) for checkpoints
    resume: str = "auto"  # auto: resume exp_name only if its recorded config is the same | never | must
    max_failures: int = 0  # worker or node failures Ray Train recovers from (from the last checkpoint)
    num_checkpoints_to_keep: int = 2  # older checkpoints are deleted
    log_example_ids: bool = False  # write which episodes each step trained on, per rank
    verbose: bool = False  # jobs.train: Ray's and the libraries' output on the console too (else only <exp_name>.log)

    @property
    def stage(self) -> int:
        return self.zero_stage if self.zero_stage is not None else TRAINER_ZERO_STAGE[self.trainer]

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.gradient_accumulation_steps * self.num_workers)

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.exp_name}"

    @property
    def local_dir(self) -> str:
        """The run folder on this filesystem: the run itself, or runs/<exp_name> beside a URI storage_path."""
        return self.run_dir if "://" not in self.run_dir else os.path.abspath(os.path.join("runs", self.exp_name))


def _one_of(name: str, value: object, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value} is not one of {', '.join(map(str, allowed))}")


def validate(cfg: TrainConfig) -> TrainConfig:
    if not cfg.datasets:
        raise ConfigError("datasets=[...] is required: the preference data to train on")
    _one_of("loss", cfg.loss.name, ("sft", "dpo", "ipo"))
    _one_of("trainer", cfg.trainer, TRAINER_ZERO_STAGE)
    _one_of("zero_stage", cfg.stage, (0, 1, 2, 3))
    _one_of("optimizer", cfg.optimizer, ("RMSprop", "AdamW", "Adam", "SGD"))
    _one_of("lr_schedule", cfg.lr_schedule, ("constant", "cosine"))
    _one_of("sft_target", cfg.sft_target, ("chosen", "both"))
    _one_of("description_mode", cfg.description_mode, ("none", "generated", "teacher_forced"))
    for name in ("policy_dtype", "reference_dtype"):
        _one_of(f"model.{name}", getattr(cfg.model, name), ("auto", "float32", "bfloat16", "float16"))
    _one_of("resume", cfg.resume, ("auto", "never", "must"))
    _one_of("placement_strategy", cfg.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    if cfg.preferred_only and cfg.description_mode != "none":
        raise ConfigError(f"preferred_only=true has no description_mode={cfg.description_mode} prompt "
                          "(fspo-method.md §1.4)")
    for name in ("shots", "passes", "min_shots"):
        value = getattr(cfg, name)
        if value is not None and value < (0 if name == "shots" else 1):
            raise ConfigError(f"{name}={value} must be >= {0 if name == 'shots' else 1}")
    if cfg.min_shots is not None and cfg.shots is not None and cfg.min_shots > cfg.shots:
        raise ConfigError(f"min_shots={cfg.min_shots} must be <= shots={cfg.shots}")
    for name in ("num_workers", "reference_concurrency", "targets_per_prompt", "gradient_accumulation_steps",
                 "batch_size", "eval_batch_size", "eval_every", "max_length", "max_prompt_length",
                 "n_eval_examples"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.length_window < 0:
        raise ConfigError(f"length_window={cfg.length_window} must be >= 0")
    if cfg.n_examples is not None and cfg.n_examples < 1:
        raise ConfigError(f"n_examples={cfg.n_examples} must be >= 1")
    if cfg.lora.r < 0 or cfg.lora.alpha <= 0 or not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.r={cfg.lora.r} must be >= 0 (0: off), lora.alpha={cfg.lora.alpha} > 0, "
                          f"lora.dropout={cfg.lora.dropout} in [0, 1)")
    if cfg.lora.r and not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules=[] names no layer to adapt")
    if cfg.loss.beta <= 0:
        raise ConfigError(f"loss.beta={cfg.loss.beta} must be > 0")
    if not 0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing={cfg.loss.label_smoothing} must be in [0, 0.5)")
    if cfg.loss.label_smoothing and cfg.loss.name != "dpo":
        raise ConfigError("loss.label_smoothing applies to loss=dpo only")
    if cfg.loss.reference_free and cfg.loss.name != "dpo":  # the reference ignores it for IPO; we say so
        raise ConfigError("loss.reference_free applies to loss=dpo only")
    if cfg.loss.sft_weight and cfg.loss.name == "sft" or cfg.loss.sft_weight < 0:
        raise ConfigError(f"loss.sft_weight={cfg.loss.sft_weight}: it is a weight >= 0 on dpo/ipo's "
                          "preferred-answer NLL")
    per_step = cfg.gradient_accumulation_steps * cfg.num_workers
    if cfg.batch_size % per_step or cfg.batch_size < per_step:
        raise ConfigError(
            f"batch_size={cfg.batch_size} must be a positive multiple of gradient_accumulation_steps × num_workers "
            f"= {cfg.gradient_accumulation_steps} × {cfg.num_workers} = {per_step}"
        )
    if cfg.eval_batch_size % cfg.num_workers:
        raise ConfigError(f"eval_batch_size={cfg.eval_batch_size} must be a multiple of num_workers={cfg.num_workers}")
    if cfg.max_prompt_length > cfg.max_length:
        raise ConfigError(f"max_prompt_length={cfg.max_prompt_length} exceeds max_length={cfg.max_length}")
    if cfg.exp_name == REFERENCE_CACHE:
        raise ConfigError(f"exp_name={REFERENCE_CACHE} is the reference scores' cache beside the runs: choose another")
    if cfg.offload_optimizer and cfg.stage == 0:  # DeepSpeed would ignore it: no ZeRO optimizer to offload
        raise ConfigError("offload_optimizer=true needs zero_stage 1, 2 or 3 (trainer=BasicTrainer is stage 0)")
    if cfg.offload_params and cfg.stage != 3:
        raise ConfigError("offload_params=true needs zero_stage=3")
    if cfg.n_examples is None and not cfg.n_epochs:
        raise ConfigError("set n_epochs or n_examples")
    if "://" not in cfg.storage_path:
        cfg.storage_path = os.path.abspath(cfg.storage_path)  # Ray Train needs an absolute path
    return cfg


# Keys a resumed run may change: they do not alter what is trained or how.
RESUME_SAFE_KEYS = frozenset({"resume", "max_failures", "num_checkpoints_to_keep", "minimum_log_interval_secs",
                              "reference_concurrency", "log_example_ids", "placement_strategy", "verbose",
                              "wandb.enabled", "wandb.entity", "wandb.project"})  # fmt: skip


def differing_keys(recorded: dict, current: dict) -> dict[str, tuple]:
    """{dotted key: (recorded value, current value)} for keys that differ, resume-safe keys left out."""

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    old, new = flat(recorded), flat(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if k not in RESUME_SAFE_KEYS and old.get(k) != new.get(k)}  # fmt: skip


def parse_train_config(argv: list[str]) -> TrainConfig:
    ignored = [a.partition("=")[0] for a in argv if a.partition("=")[0].lstrip("+") in IGNORED_SEED_KEYS]
    for key in ignored:
        print(f"note: {key} has no effect here: {IGNORED_SEED_KEYS[key.lstrip('+')]}")
    return validate(parse_overrides(TrainConfig, argv, groups={"model": "name_or_path", "loss": "name"}))
