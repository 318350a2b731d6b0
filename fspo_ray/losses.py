"""Preference losses and sequence log-probs: pure functions of tensors (fspo-method.md §2).

Sequence log-probs are sums over completion tokens (EOS included), never per-token means, for every
loss, IPO included, as the reference does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PreferenceKind = Literal["dpo", "ipo"]
IGNORE_INDEX = -100  # a label that no loss reads (the prompt's positions in the plain path)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_t log π(y_t | prefix) over the positions whose label is not IGNORE_INDEX, per sequence.

    logits: (batch, seq, vocab) for the full input; labels: (batch, seq) aligned with the input, so the
    logits at position t predict the label at t+1.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    labels = labels[:, 1:]
    logits = logits[:, :-1]
    mask = labels != IGNORE_INDEX
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, labels.masked_fill(~mask, 0).unsqueeze(2))
    return (token_logps.squeeze(2) * mask).sum(-1)


def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the target completions, averaged over sequences (not tokens)."""
    return -policy_logps.mean()


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    kind: PreferenceKind = "dpo",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example (losses, chosen_rewards, rejected_rewards).

    h = [lpθ(yw) − lpθ(yl)] − [lp_ref(yw) − lp_ref(yl)]
    dpo: −(1−ε)·log σ(βh) − ε·log σ(−βh)        (ε = label_smoothing: conservative DPO)
    ipo: (h − 1/(2β))²
    plus sft_weight · (−lpθ(yw)): the preferred answer's NLL, as in RPO (Pang et al., 2024), which keeps
    a small model's generation on the preferred answers while the margin grows (off by default: the paper
    has no such term).
    Rewards are β·(lpθ − lp_ref), detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    policy_margin = policy_chosen_logps - policy_rejected_logps
    reference_margin = reference_chosen_logps - reference_rejected_logps
    h = policy_margin - (0 if reference_free else reference_margin)
    if kind == "dpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to dpo only")
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"kind must be 'dpo' or 'ipo', got {kind!r}")
    losses = losses - sft_weight * policy_chosen_logps
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
