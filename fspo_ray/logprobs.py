"""Summed completion log-probs, with each prompt computed once (prefix sharing, arXiv 2410.20305).

An FSPO prompt holds N of a user's pairs and is far longer than the completions that follow it. The plain
way (`plain_logps`) runs prompt+chosen and prompt+rejected as two rows, so every prompt token is computed
twice per model. `packed_logps` runs one row per episode instead:

    tokens       [ prompt .......... | chosen ...... | rejected .... | pad ]
    position ids   0 1 ... P-1         P ... P+C-1     P ... P+R-1     0 ...

with a 4-D attention mask in which every token sees the prompt and the earlier tokens of its own
completion, and rejected never sees chosen. Each completion therefore sits exactly where it would after
the prompt alone (same positions, same visible keys): the log-probs equal the plain path's. Sliding-window
layers (Mistral, Qwen2, Gemma) get the same mask cut to their window, counted in positions.

We chose one packed row over a prompt forward whose KV cache the two completions extend: transformers
drops the cache under gradient checkpointing, and the mask works the same under every ZeRO stage. The
mask needs an attention kernel that takes arbitrary masks: SDPA (math kernel on CPU, memory-efficient
kernel on GPU); flash-attention's varlen form cannot express "rejected skips chosen".

The LM head and the log-softmax run only at the positions that predict a completion token: a prompt
position never produces a vocabulary-sized row (for a 49k vocabulary that is most of a forward's cost).
That skips the model's own forward, so each family's head rules (soft-capping, logit scaling) are
repeated here (`LOGITS`); a family not listed there is scored through its own forward instead.

In training the policy is a `CompletionLogps` module handed to DeepSpeed, so every forward goes through the
engine: ZeRO-3 counts micro-steps and hooks its backward there (a forward that called the model's
submodules directly made gradient accumulation keep only the last micro-batch).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fspo_ray.losses import IGNORE_INDEX, sequence_logps
from fspo_ray.models import load_for_inference, padding_id

logger = logging.getLogger(__name__)

# The columns a tokenized episode carries: prompt ids, and each completion's ids with its EOS.
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# Where a row scores several prompts sharing their start: per prompt, how many of prompt_ids' tokens it
# keeps and the tokens that follow them (see `pack_branches`).
BRANCH_COLUMNS = ("branch_cuts", "branch_tails")
# Raise when the scores this module computes for the same model and tokens change: cached reference
# scores (train/reference.py) are keyed on it.
SCORER_VERSION = 1


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L) bool, True = may attend
    source: torch.Tensor  # (N,) flat index into B·L of the hidden state that predicts each completion token
    target: torch.Tensor  # (N,) the completion token predicted there
    sequence: torch.Tensor  # (N,) which completion the token belongs to: chosen j → j, rejected j → branches + j
    # Per completion, in `sequence`'s numbering: (row, the row's spans that make its plain sequence, where the
    # completion starts in that sequence): what `plain_logps` rebuilds.
    plain: tuple[tuple[int, tuple[tuple[int, int], ...], int], ...]
    num_sequences: int
    tokens: int  # real (non-padding) tokens
    padding: int  # padding tokens


# A branch continues the first `cut` tokens of its row's prompt with `tail` (the rest of its own prompt), then
# scores `chosen` and `rejected` (or `chosen` alone: None) after it.
Branch = tuple[int, Sequence[int], Sequence[int], Sequence[int] | None]


def pack(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]] | None,
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """One right-padded row per episode: [prompt | chosen | rejected] (or [prompt | chosen] without rejected)."""
    rejected = rejected if rejected is not None else [None] * len(prompts)
    rows = [(p, [(len(p), (), c, r)]) for p, c, r in zip(prompts, chosen, rejected)]
    return pack_branches(rows, pad_token_id, device)


def pack_branches(
    rows: Sequence[tuple[Sequence[int], Sequence[Branch]]], pad_token_id: int, device: torch.device | str = "cpu"
) -> PackedBatch:
    """One right-padded row per (prompt, branches): the prompt once, then each branch's tail and completions.

        tokens       [ prompt ...... | tail₁ | chosen₁ | rejected₁ | tail₂ | chosen₂ | rejected₂ | pad ]
        position ids   0 ...           cut₁ …  after tail₁           cut₂ …  after tail₂

    Branch j's tail sees the prompt's first cut_j tokens and itself; its completions see those, the tail and
    themselves (rejected never sees chosen). Each completion thus sits exactly where it would after
    `prompt[:cut] + tail` alone. Evaluation scores every k of an episode in one row this way: a k-shot prompt
    is the longest prompt's first tokens up to its task line. Completions are numbered over the whole batch:
    branch j's chosen is j, its rejected (number of branches) + j."""
    flat = [branch for _, branches in rows for branch in branches]
    with_rejected = {branch[3] is not None for branch in flat}
    if len(with_rejected) != 1:
        raise ValueError("every branch needs a rejected completion, or none does")
    with_rejected, n_branches = with_rejected.pop(), len(flat)
    lengths = [len(p) + sum(len(t) + len(c) + (len(r) if r is not None else 0) for _, t, c, r in bs) for p, bs in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 padding, 0 the prompt, then 3 per branch
    sees = torch.zeros((len(rows), 1 + 3 * max(len(bs) for _, bs in rows), width), dtype=torch.bool)  # beyond itself
    source, target, sequence = [], [], []
    plain: list = [None] * (2 * n_branches if with_rejected else n_branches)
    j = 0
    for i, (prompt, branches) in enumerate(rows):
        P, at = len(prompt), len(prompt)
        input_ids[i, :P] = torch.tensor(list(prompt), dtype=torch.long)
        position_ids[i, :P], segment[i, :P] = torch.arange(P), 0
        for b, (cut, tail, chosen, rejected) in enumerate(branches):
            if not 0 <= cut <= P:
                raise ValueError(f"row {i}: a branch cuts the prompt at {cut}, outside its {P} tokens")
            if cut + len(tail) == 0:
                raise ValueError(f"row {i}: empty prompt (a completion's first token needs a position to predict it)")
            tail_segment, context = 1 + 3 * b, cut + len(tail)
            tail_span = (at, at + len(tail))
            sees[i, tail_segment, :cut] = True
            completions = [(chosen, j)] + ([(rejected, n_branches + j)] if with_rejected else [])
            for n, (tokens, seq) in enumerate([(tail, None), *completions]):
                end, start = at + len(tokens), cut if n == 0 else context
                input_ids[i, at:end] = torch.tensor(list(tokens), dtype=torch.long)
                position_ids[i, at:end] = torch.arange(start, start + len(tokens))
                segment[i, at:end] = tail_segment + n
                if n:  # a completion sees what its tail sees, and the tail
                    sees[i, tail_segment + n] = sees[i, tail_segment]
                    sees[i, tail_segment + n, tail_span[0] : tail_span[1]] = True
                    # Token t is predicted by the hidden state before it: the context's last for t = 0.
                    last = tail_span[1] - 1 if len(tail) else cut - 1
                    source += [i * width + last] + [i * width + at + t - 1 for t in range(1, len(tokens))]
                    target += list(tokens)
                    sequence += [seq] * len(tokens)
                    plain[seq] = (i, ((0, cut), tail_span, (at, end)), context)
                at = end
            j += 1
    real = int((segment != -1).sum())
    # The (B, L, L) mask is built on the model's device from O(B·L) segment ids: the host never holds or copies
    # it (at the paper's 8,192 tokens a batch of 4 is 268 MB of booleans).
    segment, sees = segment.to(device), sees.to(device)
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    beyond = torch.gather(sees, 1, segment.clamp(min=0).unsqueeze(2).expand(-1, -1, width))
    mask = ((query == key) & causal & (key != -1)) | (beyond & (query != -1))
    mask |= torch.eye(width, dtype=torch.bool, device=device) & (query == -1)  # a padding row attends to itself
    return PackedBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=mask.unsqueeze(1),
        source=torch.tensor(source, dtype=torch.long, device=device),
        target=torch.tensor(target, dtype=torch.long, device=device),
        sequence=torch.tensor(sequence, dtype=torch.long, device=device),
        plain=tuple(plain),
        num_sequences=len(plain),
        tokens=real,
        padding=len(rows) * width - real,
    )


def _softcap(config, logits: torch.Tensor) -> torch.Tensor:
    cap = config.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


# What each family's *ForCausalLM.forward does to its LM head's output (transformers 5.19), which the packed
# path repeats at the positions it keeps. Every family here is tested against its own forward
# (tests/test_logprobs.py); one not listed is scored by its own forward (plain_logps).
LOGITS = {
    "llama": lambda config, logits: logits,
    "mistral": lambda config, logits: logits,
    "qwen2": lambda config, logits: logits,
    "qwen3": lambda config, logits: logits,
    "gemma2": _softcap,
    "gemma3_text": _softcap,
    "granite": lambda config, logits: logits / config.logits_scaling,
    "cohere": lambda config, logits: logits * config.logit_scale,
}


@functools.cache
def _packs(model_type: str, bidirectional: bool) -> bool:
    """Whether the packed path reproduces this family; says once per process when it does not."""
    if model_type in LOGITS and not bidirectional:
        return True
    logger.warning(f"model type {model_type!r}{' (bidirectional attention)' if bidirectional else ''}: the packed "
                   f"forward knows {', '.join(LOGITS)}; scoring through the model's own forward instead (each "
                   "prompt computed twice)")  # fmt: skip
    return False


def _layer_masks(config, batch: PackedBatch):
    """The packed mask as the decoder takes it: with sliding-window layers, cut to their window (in positions,
    as each completion would sit after its prompt alone) — one mask when every layer slides (Mistral), a
    {layer type: mask} dict when some do (Qwen2, Gemma)."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if window is None or (types and "sliding_attention" not in types):
        return batch.attention_mask
    distance = batch.position_ids.unsqueeze(2) - batch.position_ids.unsqueeze(1)  # query's minus key's
    windowed = batch.attention_mask & (distance < window).unsqueeze(1)
    if not types or types == {"sliding_attention"}:
        return windowed
    return {"full_attention": batch.attention_mask, "sliding_attention": windowed}


def packed_logps(model, batch: PackedBatch) -> torch.Tensor:
    """Σ log π(completion token | prompt, earlier completion tokens) per completion: (chosen..., rejected...),
    under a Hugging Face causal LM (or PEFT around one); families `LOGITS` does not list go the plain way."""
    config = model.config
    if not _packs(config.model_type, bool(getattr(config, "use_bidirectional_attention", False))):
        return plain_logps(model, batch)
    hidden = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=_layer_masks(config, batch),
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    logits = model.get_output_embeddings()(hidden.flatten(0, 1)[batch.source])
    token_logps = -F.cross_entropy(LOGITS[config.model_type](config, logits).float(), batch.target, reduction="none")
    sums = torch.zeros(batch.num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, batch.sequence, token_logps)


def plain_logps(model, batch: PackedBatch) -> torch.Tensor:
    """The plain path, the one `packed_logps` is tested against: each completion after its own prompt as a
    separate right-padded row through the model's own forward, full logits, then its log-probs summed."""
    rows = [torch.cat([batch.input_ids[i, a:b] for a, b in spans]) for i, spans, _ in batch.plain]
    # Padding is masked and unlabelled: any id will do.
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for i, (row, (_, _, start)) in enumerate(zip(rows, batch.plain)):
        labels[i, start : len(row)] = row[start:]
        attention_mask[i, : len(row)] = 1
    return sequence_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)


class CompletionLogps(torch.nn.Module):
    """A causal LM whose forward is `packed_logps` of a PackedBatch: what training hands to
    `deepspeed.initialize`, so the engine's own forward (micro-step counting, ZeRO-3's gathers and backward
    hooks, offload) runs every training step. Call it as `module(batch=...)`: ZeRO-3's module hooks look only
    at positional inputs, and a PackedBatch is not a tensor."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm  # a Hugging Face causal LM, or PEFT around one

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return packed_logps(self.lm, batch)


class CompletionScorer:
    """A Ray Data batch-inference actor: each row's summed chosen and rejected log-probs under one or more
    models, with the packed forward, as columns `{name}_chosen` and `{name}_rejected`.

    A row is an episode's `TOKEN_COLUMNS`; with `BRANCH_COLUMNS` too it holds several prompts that share their
    first tokens (evaluation's k-shot prompts of one episode, see `pack_branches`), scored in one row: then
    each score column holds a list, one score per branch.

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
        n, branched = len(batch["prompt_ids"]), BRANCH_COLUMNS[0] in batch
        rows = [self._branches(batch, i, branched) for i in range(n)]
        size = [len(prompt) + sum(len(t) + len(c) + len(r) for _, t, c, r in bs) for prompt, bs in rows]
        order = sorted(range(n), key=size.__getitem__)
        scores = {f"{name}_{side}": [None] * n for name in self.models for side in ("chosen", "rejected")}
        for start in range(0, n, self.rows_per_forward):
            group = order[start : start + self.rows_per_forward]
            packed = pack_branches([rows[i] for i in group], self.pad_id, self.device)
            for name, model in self.models.items():
                with torch.no_grad():
                    logps = packed_logps(model, packed).tolist()
                chosen, rejected = logps[: len(logps) // 2], logps[len(logps) // 2 :]
                for i in group:
                    count = len(rows[i][1])
                    scores[f"{name}_chosen"][i], chosen = chosen[:count], chosen[count:]
                    scores[f"{name}_rejected"][i], rejected = rejected[:count], rejected[count:]
        if not branched:
            scores = {column: [values[0] for values in lists] for column, lists in scores.items()}
        return {**batch, **scores}

    @staticmethod
    def _branches(batch: dict, i: int, branched: bool) -> tuple[list[int], list[Branch]]:
        prompt, chosen, rejected = (list(batch[c][i]) for c in TOKEN_COLUMNS)
        if not branched:
            return prompt, [(len(prompt), [], chosen, rejected)]
        cuts, tails = (batch[c][i] for c in BRANCH_COLUMNS)
        return prompt, [(int(cut), list(tail), chosen, rejected) for cut, tail in zip(cuts, tails)]
