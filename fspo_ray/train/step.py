"""One batch: collate token rows, run policy (and reference), compute the loss and its metrics.

Metrics come back as per-batch sums with a count, so ranks and micro-batches combine exactly
(sum of sums / sum of counts) into the DPO codebase's names (fspo-method.md §4).
"""

from __future__ import annotations

from typing import Any

import torch

from fspo_ray.data.tokenize import IGNORE_INDEX
from fspo_ray.losses import preference_loss, sequence_logps, sft_loss


def collate(rows: dict[str, Any], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected sequences of a batch to one length, stacked chosen-first."""
    sequences = list(rows["chosen_input_ids"]) + list(rows["rejected_input_ids"])
    labels = list(rows["chosen_labels"]) + list(rows["rejected_labels"])
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (tokens, targets) in enumerate(zip(sequences, labels)):
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        label_ids[i, : len(targets)] = torch.tensor(targets)
        attention_mask[i, : len(tokens)] = 1
    return {
        "input_ids": input_ids.to(device),
        "labels": label_ids.to(device),
        "attention_mask": attention_mask.to(device),
    }


def model_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])


def forward_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of (chosen, rejected), in one forward pass over both."""
    logps = model_logps(model, batch)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def batch_loss(policy, reference, batch, loss_cfg, sft_target: str, split: str) -> tuple[torch.Tensor, dict]:
    """(mean loss, {metric: (sum, count)}) for one batch."""
    if loss_cfg.name == "sft":
        if sft_target == "chosen":  # no need to run the rejected half through the model
            half = batch["input_ids"].shape[0] // 2
            batch = {k: v[:half] for k, v in batch.items()}
            chosen = targets = model_logps(policy, batch)
        else:
            chosen, rejected = forward_logps(policy, batch)
            targets = torch.cat([chosen, rejected])
        loss = sft_loss(targets)
        n = chosen.shape[0]
        metrics = {f"logps_{split}/chosen": (chosen.detach().sum(), n), f"loss/{split}": (loss.detach() * n, n)}
        return loss, metrics

    policy_chosen, policy_rejected = forward_logps(policy, batch)
    with torch.no_grad():
        reference_chosen, reference_rejected = forward_logps(reference, batch)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        beta=loss_cfg.beta,
        kind=loss_cfg.name,
        label_smoothing=loss_cfg.label_smoothing,
        reference_free=loss_cfg.reference_free,
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
