"""The driver: resolve the model, prepare the data on the cluster, run the TorchTrainer."""

from __future__ import annotations

import json
import logging
import os

from fspo_ray.config import ConfigError
from fspo_ray.console import progress_bar
from fspo_ray.data.readers import default_shots
from fspo_ray.data.tokenize import PromptStyle
from fspo_ray.models import archive_to_folder, resolve_model
from fspo_ray.scheduling import resolve_use_gpu
from fspo_ray.train.config import TrainConfig, differing_keys
from fspo_ray.train.loop import LoopPlan, train_loop
from fspo_ray.train.pipeline import add_reference, prepare
from fspo_ray.train.reference import reference_scoring

logger = logging.getLogger(__name__)  # details for the log file; the console gets one line per stage


RUN_CONFIG = "fspo_config.json"  # in the run folder: the config it was started with


def claim_run_dir(cfg: TrainConfig) -> bool:
    """Record the config in the run folder, or check it against the recorded one; True if resuming.

    Ray Train resumes whatever earlier run has the same exp_name and storage_path; resuming one started
    with another config would silently train (or skip training) on the wrong plan, so it is refused
    with the differing keys named."""
    import pyarrow.fs
    from omegaconf import OmegaConf

    current = OmegaConf.to_container(OmegaConf.structured(cfg))
    fs, folder = pyarrow.fs.FileSystem.from_uri(cfg.run_dir)
    path = f"{folder}/{RUN_CONFIG}"
    started = fs.get_file_info(folder).type != pyarrow.fs.FileType.NotFound
    recorded = None
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(path) as f:
            recorded = json.loads(f.read())
    if cfg.resume == "never" and started:
        raise ConfigError(f"{cfg.run_dir} exists and resume=never: choose a new exp_name, or remove it")
    if cfg.resume == "must" and recorded is None:
        raise ConfigError(f"resume=must, but {cfg.run_dir} holds no run to resume")
    if started and recorded is None:
        raise ConfigError(f"{cfg.run_dir} exists but records no config ({RUN_CONFIG}), so resuming it cannot be "
                          "checked: choose a new exp_name, or remove it")  # fmt: skip
    if recorded is not None:
        changed = differing_keys(recorded, current)
        if changed:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(f"exp_name={cfg.exp_name} at {cfg.run_dir} was started with another config ({listed}); "
                              "resuming it would train on the wrong plan: choose a new exp_name")  # fmt: skip
        return True
    fs.create_dir(folder)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(current, indent=1).encode())
    return False


def run_training(cfg: TrainConfig, fitted_cache: dict | None = None):
    """Train; return Ray Train's Result. Re-running the same exp_name and storage_path with the same
    config resumes; with another config it stops, naming what differs (see claim_run_dir).
    `fitted_cache` (pipeline.prepare) lets the next stage on the same data skip building its episodes."""
    if claim_run_dir(cfg):
        print(f"[{cfg.exp_name}] resuming {cfg.run_dir}: its recorded config is this one", flush=True)

    model_path = resolve_model(cfg.model.name_or_path)
    tokenizer_path = cfg.model.tokenizer_name_or_path or model_path
    start_model = model_path
    if cfg.model.archive:
        start_model = archive_to_folder(cfg.model.archive, model_path, os.path.join(cfg.local_dir, "archive"))

    shots = cfg.shots if cfg.shots is not None else default_shots(cfg.datasets[0], cfg.data_split)
    if cfg.min_shots is not None and cfg.min_shots > shots:
        raise ConfigError(f"min_shots={cfg.min_shots} must be <= shots={shots} (the data format's)")
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    reference = reference_scoring(cfg, start_model, tokenizer_path, use_gpu)
    common = dict(
        shots=shots,
        tokenizer_path=tokenizer_path,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        style=PromptStyle(cfg.preferred_only, cfg.description_mode),
        seed=cfg.seed,
        targets=cfg.targets_per_prompt,
        fitted_cache=fitted_cache,
    )
    train = prepare(
        cfg.datasets, split=cfg.data_split, passes=cfg.passes, purpose="train", rows_per_step=cfg.batch_size,
        limit=cfg.n_examples, length_window=cfg.length_window, min_shots=cfg.min_shots, **common
    )
    sets = {"train": train}
    summary = {"train": train.stats, "train_examples_per_epoch": train.examples}
    if cfg.eval_datasets:
        sets["eval"] = prepare(
            cfg.eval_datasets, split=cfg.eval_split, passes=1, purpose="eval", rows_per_step=cfg.num_workers,
            limit=cfg.n_eval_examples, **common,
        )  # fmt: skip
        summary.update(eval=sets["eval"].stats, eval_examples=sets["eval"].examples)
    if reference is not None:  # the rows that will be used, training's and held-out alike, in one pass
        summary["reference_scored"] = add_reference(list(sets.values()), reference)
    datasets = {f"{name}_{r}": shard for name, s in sets.items() for r, shard in enumerate(s.shards(cfg.num_workers))}

    steps_per_epoch = train.examples // cfg.batch_size
    total_steps = cfg.n_examples // cfg.batch_size if cfg.n_examples else cfg.n_epochs * steps_per_epoch
    summary.update(
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, planned_examples=total_steps * cfg.batch_size
    )
    logger.info(f"[{cfg.exp_name}] data: {json.dumps(summary)}")
    held_out = f"; {summary['eval_examples']:,} held-out episodes" if cfg.eval_datasets else ""
    scored = f"; reference scored for {summary['reference_scored']:,}" if "reference_scored" in summary else ""
    counts = f"{cfg.min_shots}-{shots}" if cfg.min_shots is not None and cfg.min_shots < shots else shots
    print(f"[{cfg.exp_name}] {summary['planned_examples']:,} episodes of {counts} shots from {train.stats['users']:,} users"
          f" in {total_steps:,} steps{held_out}{scored} (details: the data line in the log)", flush=True)  # fmt: skip

    cpus = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else (1.0 if use_gpu else 0.5)
    resources = {"CPU": cpus, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    with progress_bar(total_steps, f"[{cfg.exp_name}] {cfg.loss.name}") as progress:
        plan = LoopPlan(
            cfg, start_model, model_path, tokenizer_path, steps_per_epoch, total_steps, bool(cfg.eval_datasets),
            summary, reference_precomputed=reference is not None, progress=progress,
        )  # fmt: skip
        result = _trainer(cfg, plan, datasets, use_gpu, resources).fit()
    print(f"[{cfg.exp_name}] done: model at {cfg.run_dir}/LATEST, metrics at {cfg.run_dir}/metrics.jsonl", flush=True)
    return result


def _trainer(cfg: TrainConfig, plan: LoopPlan, datasets: dict, use_gpu: bool, resources: dict):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=plan,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.exp_name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # already split, deterministically, by prepare()
    )
