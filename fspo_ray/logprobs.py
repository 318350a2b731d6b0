"""Summed completion log-probs, with each prompt computed once (prefix sharing, arXiv 2410.20305).

An FSPO prompt holds N of a user's pairs and is far longer than the completions that follow it. The plain
way (`concatenated_logps`) runs prompt+chosen and prompt+rejected as two rows, so every prompt token is
computed twice per model. `packed_logps` runs one row per episode instead:

    tokens       [ prompt .......... | chosen ...... | rejected .... | pad ]
    position ids   0 1 ... P-1         P ... P+C-1     P ... P+R-1     0 ...

with a 4-D attention mask in which every token sees the prompt and the earlier tokens of its own
completion, and rejected never sees chosen. Each completion therefore sits exactly where it would after
the prompt alone (same positions, same visible keys): the log-probs equal the plain path's.

We chose one packed row over a prompt forward whose KV cache the two completions extend: transformers
drops the cache under gradient checkpointing, and the mask works the same under every ZeRO stage. The
mask needs an attention kernel that takes arbitrary masks: SDPA (math kernel on CPU, memory-efficient
kernel on GPU); flash-attention's varlen form cannot express "rejected skips chosen".

The LM head and the log-softmax run only at the positions that predict a completion token: a prompt
position never produces a vocabulary-sized row (for a 49k vocabulary that is most of a forward's cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fspo_ray.losses import IGNORE_INDEX, sequence_logps
from fspo_ray.models import load_for_inference, padding_id

# The columns a tokenized episode carries: prompt ids, and each completion's ids with its EOS.
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L) bool, True = may attend
    source: torch.Tensor  # (N,) flat index into B·L of the hidden state that predicts each completion token
    target: torch.Tensor  # (N,) the completion token predicted there
    sequence: torch.Tensor  # (N,) which completion the token belongs to: chosen i → i, rejected i → B + i
    num_sequences: int
    tokens: int  # real (non-padding) tokens
    padding: int  # padding tokens


_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3


def pack(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]] | None,
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """One right-padded row per episode: [prompt | chosen | rejected] (or [prompt | chosen] without rejected)."""
    rows, with_rejected = len(prompts), rejected is not None
    rejected = rejected if with_rejected else [[] for _ in range(rows)]
    width = max(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    segment = torch.full((rows, width), _PAD, dtype=torch.long)
    source, target, sequence = [], [], []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        if len(p) == 0:
            raise ValueError(f"row {i}: empty prompt (a completion's first token needs a position to predict it)")
        P, C, R = len(p), len(c), len(r)
        input_ids[i, : P + C + R] = torch.tensor([*p, *c, *r], dtype=torch.long)
        position_ids[i, : P + C] = torch.arange(P + C)
        position_ids[i, P + C : P + C + R] = torch.arange(P, P + R)
        segment[i, :P], segment[i, P : P + C], segment[i, P + C : P + C + R] = _PROMPT, _CHOSEN, _REJECTED
        base = i * width
        # Token t of a completion is predicted by the hidden state before it: the prompt's last for t = 0.
        for start, tokens, seq in ((P, c, i), (P + C, r, rows + i)) if with_rejected else ((P, c, i),):
            source += [base + P - 1] + [base + start + t - 1 for t in range(1, len(tokens))]
            target += list(tokens)
            sequence += [seq] * len(tokens)
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (key != _PAD) & ~((query == _REJECTED) & (key == _CHOSEN))
    mask |= torch.eye(width, dtype=torch.bool) & (query == _PAD)  # a padding row attends to itself, never NaN
    real = int((segment != _PAD).sum())
    return PackedBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=mask.unsqueeze(1).to(device),
        source=torch.tensor(source, dtype=torch.long, device=device),
        target=torch.tensor(target, dtype=torch.long, device=device),
        sequence=torch.tensor(sequence, dtype=torch.long, device=device),
        num_sequences=2 * rows if with_rejected else rows,
        tokens=real,
        padding=rows * width - real,
    )


def _unwrap(model):
    """The Hugging Face model inside a DeepSpeed engine (its submodules carry ZeRO-3's gather hooks)."""
    return getattr(model, "module", model)


def packed_logps(model, batch: PackedBatch) -> torch.Tensor:
    """Σ log π(completion token | prompt, earlier completion tokens) per completion: (chosen..., rejected...)."""
    model = _unwrap(model)
    hidden = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    logits = model.get_output_embeddings()(hidden.flatten(0, 1)[batch.source]).float()
    token_logps = -F.cross_entropy(logits, batch.target, reduction="none")
    sums = torch.zeros(batch.num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, batch.sequence, token_logps)


def concatenated_logps(
    model,
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The plain path, the one `packed_logps` is tested against: prompt+chosen and prompt+rejected as
    separate right-padded rows, full logits, then the completion tokens' log-probs summed."""
    sequences = [list(p) + list(c) for p, c in zip(prompts, chosen)] + [
        list(p) + list(r) for p, r in zip(prompts, rejected)
    ]
    prompt_lengths = [len(p) for p in prompts] * 2
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (tokens, start) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        labels[i, start : len(tokens)] = torch.tensor(tokens[start:])
        attention_mask[i, : len(tokens)] = 1
    logits = _unwrap(model)(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return sequence_logps(logits, labels.to(device))


class CompletionScorer:
    """A Ray Data batch-inference actor: each row's summed chosen and rejected log-probs under one or more
    models, with the packed forward, as columns `{name}_chosen` and `{name}_rejected`.

    Rows are run shortest first in groups of `rows_per_forward`, so little of a forward is padding; the
    output keeps the input's row order.
    """

    def __init__(self, models: dict[str, str], dtype: str = "auto", rows_per_forward: int = 8):
        loaded: dict[str, object] = {}
        self.models = {}
        for name, path in models.items():  # one copy of a model scored under two names
            if path not in loaded:
                loaded[path], self.tokenizer, self.device = load_for_inference(path, dtype, attention="sdpa")
            self.models[name] = loaded[path]
        self.pad_id = padding_id(self.tokenizer)
        self.rows_per_forward = rows_per_forward

    def __call__(self, batch: dict) -> dict:
        n = len(batch["prompt_ids"])
        order = sorted(range(n), key=lambda i: sum(len(batch[c][i]) for c in TOKEN_COLUMNS))
        scores = {f"{name}_{side}": [0.0] * n for name in self.models for side in ("chosen", "rejected")}
        for start in range(0, n, self.rows_per_forward):
            rows = order[start : start + self.rows_per_forward]
            packed = pack(*([batch[c][i] for i in rows] for c in TOKEN_COLUMNS), self.pad_id, self.device)
            for name, model in self.models.items():
                with torch.no_grad():
                    logps = packed_logps(model, packed).tolist()
                chosen, rejected = logps[: len(rows)], logps[len(rows) :]
                for j, i in enumerate(rows):
                    scores[f"{name}_chosen"][i], scores[f"{name}_rejected"][i] = chosen[j], rejected[j]
        return {**batch, **scores}
