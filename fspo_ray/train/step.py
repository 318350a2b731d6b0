"""One batch: pack token rows, run the policy (and the reference, unless its scores were precomputed),
compute the loss and its metrics; one optimizer step: its micro-batches through the DeepSpeed engine.

Metrics come back as per-batch sums with a count, so ranks and micro-batches combine exactly
(sum of sums / sum of counts) into the DPO codebase's names (fspo-method.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fspo_ray.logprobs import SHOTS_LENGTH, PackedBatch, pack
from fspo_ray.losses import preference_loss, sft_loss
from fspo_ray.train.reference import COLUMNS as REFERENCE_COLUMNS


@dataclass(frozen=True)
class StepBatch:
    packed: PackedBatch
    reference_logps: torch.Tensor | None  # (2B,): chosen..., rejected..., when precomputed


def collate(rows: dict[str, Any], pad_token_id: int, device: torch.device, *, with_rejected: bool) -> StepBatch:
    """Episodes as packed rows, one per shot set (logprobs.py), with their precomputed reference scores if the
    rows carry them."""
    rejected = rows["rejected_ids"] if with_rejected else None
    packed = pack(rows["prompt_ids"], rows["chosen_ids"], rejected, pad_token_id, device, rows.get(SHOTS_LENGTH))
    reference = None
    if REFERENCE_COLUMNS[0] in rows:
        scores = [float(x) for column in REFERENCE_COLUMNS for x in rows[column]]
        reference = torch.tensor(scores, dtype=torch.float32, device=device)
    return StepBatch(packed, reference)


def needs_rejected(loss_name: str, sft_target: str) -> bool:
    """SFT on the chosen completion alone never runs the rejected one through the model."""
    return not (loss_name == "sft" and sft_target == "chosen")


def batch_loss(policy, reference, batch: StepBatch, loss_cfg, sft_target: str, split: str) -> tuple[torch.Tensor, dict]:
    """(mean loss, {metric: (sum, count)}) for one batch. `policy` and `reference` are called as
    `f(batch=PackedBatch)` for log-probs: a CompletionLogps (logprobs.py) or a DeepSpeed engine around one.
    `reference` may be None when the batch carries precomputed reference scores (or for SFT)."""
    reference_logps = batch.reference_logps
    if loss_cfg.name != "sft" and reference_logps is None:
        if reference is None:
            raise ValueError(f"loss={loss_cfg.name} needs a reference model or precomputed reference scores")
        with torch.no_grad():  # before the policy: its forward and backward then follow each other
            reference_logps = reference(batch=batch.packed)
    logps = policy(batch=batch.packed)
    if loss_cfg.name == "sft":
        n = batch.packed.examples
        chosen = logps[:n]
        loss = sft_loss(logps if sft_target == "both" else chosen)
        metrics = {f"logps_{split}/chosen": (chosen.detach().sum(), n), f"loss/{split}": (loss.detach() * n, n)}
        return loss, metrics

    policy_chosen, policy_rejected = logps.chunk(2)
    reference_chosen, reference_rejected = reference_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        beta=loss_cfg.beta,
        kind=loss_cfg.name,
        label_smoothing=loss_cfg.label_smoothing,
        reference_free=loss_cfg.reference_free,
        sft_weight=loss_cfg.sft_weight,
    )
    n = losses.shape[0]
    metrics = {
        f"rewards_{split}/chosen": chosen_rewards.sum(),
        f"rewards_{split}/rejected": rejected_rewards.sum(),
        f"rewards_{split}/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        f"rewards_{split}/margins": (chosen_rewards - rejected_rewards).sum(),
        f"logps_{split}/chosen": policy_chosen.detach().sum(),
        f"logps_{split}/rejected": policy_rejected.detach().sum(),
        f"loss/{split}": losses.detach().sum(),
    }
    return losses.mean(), {k: (v, n) for k, v in metrics.items()}


def add_metrics(total: dict[str, list], new: dict[str, tuple]) -> None:
    for key, (value, count) in new.items():
        entry = total.setdefault(key, [0.0, 0])
        entry[0] += float(value)
        entry[1] += count


def train_step(engine, reference, micro_batches, loss_cfg, sft_target: str) -> tuple[dict[str, list], float]:
    """One optimizer step: each of its `gradient_accumulation_steps` micro-batches through the engine's forward,
    backward and step, as DeepSpeed counts them. Returns the metrics' totals and the gradient norm before
    clipping (nan where no one computed it)."""
    totals: dict[str, list] = {}
    boundary_norm = float("nan")
    for batch in micro_batches:
        loss, metrics = batch_loss(engine, reference, batch, loss_cfg, sft_target, "train")
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            boundary_norm = _grad_norm(engine)
        engine.step()
        add_metrics(totals, metrics)
    grad_norm = engine.get_global_grad_norm()  # ZeRO-1..3 and bf16 record it; fp32 ZeRO-0 does not
    return totals, boundary_norm if grad_norm is None else float(grad_norm)


def _grad_norm(engine) -> float:
    """The gradient norm before clipping, where DeepSpeed's engine would not report it."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return float("nan")  # not yet computed here; the engine reports it after the step
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
