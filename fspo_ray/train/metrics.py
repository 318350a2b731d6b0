"""Rank 0's record of a run: metrics.jsonl and TensorBoard in the run folder, Ray metrics for the dashboard,
W&B when asked, a log line and the driver's progress bar.

On resume, entries past the checkpoint are dropped so the curves hold each step once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict

from ray.util import metrics as ray_metrics

from fspo_ray.train.config import TrainConfig

# Not print(): Ray Train patches print in its workers and, where Ray has redirected stdout, emits each
# printed line twice (once to stdout, once through its logger). A logger line reaches the driver once.
logger = logging.getLogger(__name__)


def _truncate_jsonl(path: str, keep_through_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= keep_through_step]
    with open(path, "w") as f:
        f.writelines(kept)


# The live view of a run in the Ray dashboard (Prometheus names get Ray's "ray_" prefix), tagged by run.
RAY_GAUGES = {
    "loss/train": ("fspo_train_loss", "Training loss of the last optimizer step."),
    "rewards_train/accuracies": ("fspo_train_reward_accuracy", "Share of training pairs with r_w > r_l."),
    "examples_per_second": ("fspo_train_examples_per_second", "Training examples per second, all workers."),
    "tokens_per_second": ("fspo_train_tokens_per_second", "Training tokens per second, all workers."),
    "loss/eval": ("fspo_eval_loss", "Loss on the held-out examples."),
    "rewards_eval/accuracies": ("fspo_eval_reward_accuracy", "Share of held-out pairs with r_w > r_l."),
}


class MetricsLog:
    def __init__(self, cfg: TrainConfig, rank: int, resume_step: int, progress=None):
        self.cfg, self.rank, self.progress = cfg, rank, progress  # progress: the driver's bar (console.py)
        self.log_dir = cfg.local_dir  # a URI storage_path holds checkpoints; logs stay local
        os.makedirs(self.log_dir, exist_ok=True)
        self.ids_path = os.path.join(self.log_dir, "example_ids", f"rank{rank}.jsonl")
        if cfg.log_example_ids:
            os.makedirs(os.path.dirname(self.ids_path), exist_ok=True)
            _truncate_jsonl(self.ids_path, resume_step)
        self.jsonl = self.tensorboard = self.wandb = None
        self.last_print = 0.0
        if rank != 0:
            return
        path = os.path.join(self.log_dir, "metrics.jsonl")
        _truncate_jsonl(path, resume_step)
        self.jsonl = open(path, "a")
        self.gauges = {key: ray_metrics.Gauge(name, doc, tag_keys=("run",)) for key, (name, doc) in RAY_GAUGES.items()}
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(self.log_dir, "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            logger.warning("note: tensorboard is not installed; metrics go to metrics.jsonl only")
        if cfg.wandb.enabled:
            if not os.environ.get("WANDB_API_KEY"):
                logger.warning("note: wandb.enabled but WANDB_API_KEY is not set; not logging to W&B")
            else:
                import wandb

                self.wandb = wandb.init(
                    project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.exp_name, config=asdict(cfg),
                    id=cfg.exp_name, resume="allow",
                )  # fmt: skip

    def write(self, step: int, metrics: dict[str, float], progress: str | None = None) -> None:
        if self.rank != 0 or not metrics:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if self.tensorboard:
                self.tensorboard.add_scalar(key, value, step)
            if key in self.gauges:
                self.gauges[key].set(value, tags={"run": self.cfg.exp_name})
        if self.wandb:
            self.wandb.log(metrics, step=step)
        now = time.monotonic()
        if progress is None or now - self.last_print >= self.cfg.minimum_log_interval_secs:
            self.last_print = now
            shown = {
                k: v for k, v in metrics.items() if k.startswith(("loss/", "rewards_eval/acc", "rewards_train/acc"))
            }
            rates = f"{metrics['examples_per_second']:.1f} ex/s" if "examples_per_second" in metrics else ""
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            logger.info(f"[{self.cfg.exp_name}] {progress or f'eval at step {step}'} {text} {rates}".rstrip())
            if self.progress is not None:
                self.progress.put_nowait({"step": step, "text": f"{text} {rates}".strip()})

    def example_ids(self, step: int, ids: list[str]) -> None:
        if self.cfg.log_example_ids:
            with open(self.ids_path, "a") as f:
                f.write(json.dumps({"step": step, "ids": ids}) + "\n")

    def close(self) -> None:
        for sink in (self.jsonl, self.tensorboard):
            if sink:
                sink.close()
        if self.wandb:
            self.wandb.finish()
