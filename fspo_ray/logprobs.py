"""Summed completion log-probs, with each prompt computed once (prefix sharing, arXiv 2410.20305).

An FSPO prompt holds N of a user's pairs and is far longer than the completions that follow it. The plain
way (`plain_logps`) runs prompt+chosen and prompt+rejected as two rows, so every prompt token is computed
twice per model. `packed_logps` runs one row per shot set instead: the shots that its targets (episodes
with the same shots, episodes.py) share, then each target's task and question and its two answers:

    tokens       [ shots ..... | task+question₁  chosen₁ ...  rejected₁ ... | task+question₂ ... | pad ]
    position ids   0 ... S-1     S ... P₁-1      P₁ ... P₁+C₁-1 P₁ ...       S ...                 0 ...

(Pᵢ: the length of target i's prompt.) Every token sees the shots and the earlier tokens of its own
target, never another target's; rejected sees its prompt but never chosen. Each completion therefore sits
exactly where it would after its prompt alone (same positions, same visible keys): the log-probs equal the
plain path's, target by target. An episode alone (one target, or rows without `shots_lengths`) is the
row [prompt | chosen | rejected]. Sliding-window layers (Mistral, Qwen2, Gemma) get the same mask cut to
their window, counted in positions.

The mask is never built on the host: a row carries small id tensors (`branch`: the shared shots, a target,
padding; `part`: prompt, chosen, rejected), and `packed_attention_mask` turns them, on the model's device,
into what its attention takes: a FlexAttention `BlockMask` on CUDA, which skips the blocks a row's tokens
never see (one target's keys for another's queries), or a dense boolean for SDPA elsewhere (the CPU path;
the tests check it against the mask as it was built on the host, and FlexAttention's scores against
SDPA's). `packed_attention` names the kernel a model that scores packed rows should be loaded with.
Flash-attention's varlen kernels cannot express "rejected skips chosen". We chose one packed row over a
prompt forward whose KV cache the completions extend: transformers drops the cache under gradient
checkpointing, and the mask works the same under every ZeRO stage.

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

logger = logging.getLogger(__name__)

# The columns a tokenized episode carries: prompt ids, and each completion's ids with its EOS; and how many
# of the prompt's ids are the shots (tokenize.py), which the targets of one shot set share.
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
SHOTS_LENGTH = "shots_length"
# Raise when the scores this module computes for the same model and tokens change: cached reference
# scores (train/reference.py) are keyed on it.
SCORER_VERSION = 1


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (B, L): B shot sets
    position_ids: torch.Tensor  # (B, L)
    branch: torch.Tensor  # (B, L): 0 the shared shots, j the row's j-th target (prompt and answers), -1 padding
    part: torch.Tensor  # (B, L): 0 prompt, 1 chosen, 2 rejected
    source: torch.Tensor  # (N,) flat index into B·L of the hidden state that predicts each completion token
    target: torch.Tensor  # (N,) the completion token predicted there
    sequence: torch.Tensor  # (N,) which completion the token belongs to: chosen i → i, rejected i → n + i
    # Each episode's place: (row, shots' length, where its target starts in the row, and its target's
    # task+question, chosen and rejected token counts); its prompt is the row's shots + its task+question.
    spans: tuple[tuple[int, int, int, int, int, int], ...]
    examples: int  # n: the episodes (targets) packed
    num_sequences: int
    tokens: int  # real (non-padding) tokens
    padding: int  # padding tokens


def shot_set_groups(prompts: Sequence[Sequence[int]], shots_lengths: Sequence[int] | None) -> list[list[int]]:
    """Row indices grouped by the shots their prompts begin with (the targets of one shot set), in
    first-seen order; a row without shots is alone."""
    groups: dict[object, list[int]] = {}
    for i, prompt in enumerate(prompts):
        shared = int(shots_lengths[i]) if shots_lengths is not None else 0
        groups.setdefault((shared, tuple(prompt[:shared])) if shared else i, []).append(i)
    return list(groups.values())


def pack(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]] | None,
    pad_token_id: int,
    device: torch.device | str = "cpu",
    shots_lengths: Sequence[int] | None = None,
) -> PackedBatch:
    """One right-padded row per shot set (rows whose prompts begin with the same `shots_lengths[i]` ids):
    [shots | prompt₁ chosen₁ rejected₁ | prompt₂ ...], or without rejected. Without `shots_lengths` every
    episode is its own row, [prompt | chosen | rejected]."""
    n, with_rejected = len(prompts), rejected is not None
    rejected = rejected if with_rejected else [[] for _ in range(n)]
    rows, source, target, sequence = [], [], [], []  # source as (row, column) until the width is known
    spans: list[tuple[int, ...]] = [()] * n
    for g, members in enumerate(shot_set_groups(prompts, shots_lengths)):
        shared = int(shots_lengths[members[0]]) if shots_lengths is not None else 0
        tokens, positions = list(prompts[members[0]][:shared]), list(range(shared))
        branch, part = [0] * shared, [0] * shared
        for j, i in enumerate(members, start=1):
            p, c, r = list(prompts[i][shared:]), list(chosen[i]), list(rejected[i])
            if shared + len(p) == 0:
                raise ValueError(f"row {i}: empty prompt (a completion's first token needs a position to predict it)")
            start, end = len(tokens), shared + len(p)  # where the target begins in the row; its prompt's length
            spans[i] = (g, shared, start, len(p), len(c), len(r))
            tokens += [*p, *c, *r]
            positions += [*range(shared, end), *range(end, end + len(c)), *range(end, end + len(r))]
            branch += [j] * (len(p) + len(c) + len(r))
            part += [0] * len(p) + [1] * len(c) + [2] * len(r)
            last = start + len(p) - 1  # the prompt's last token (the shots' last when p is empty)
            answers = ((start + len(p), c, i), (start + len(p) + len(c), r, n + i))
            for first, answer, seq in answers if with_rejected else answers[:1]:
                # Token t of a completion is predicted by the hidden state before it: the prompt's last for t = 0.
                source += [(g, last)] + [(g, first + t - 1) for t in range(1, len(answer))]
                target += answer
                sequence += [seq] * len(answer)
        rows.append((tokens, positions, branch, part))
    width = max(len(tokens) for tokens, *_ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    branch_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    part_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for g, (tokens, positions, branch, part) in enumerate(rows):
        for tensor, values in ((input_ids, tokens), (position_ids, positions), (branch_ids, branch), (part_ids, part)):
            tensor[g, : len(values)] = torch.tensor(values, dtype=torch.long)
    real = sum(len(tokens) for tokens, *_ in rows)
    return PackedBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        branch=branch_ids.to(device),
        part=part_ids.to(device),
        source=torch.tensor([g * width + column for g, column in source], dtype=torch.long, device=device),
        target=torch.tensor(target, dtype=torch.long, device=device),
        sequence=torch.tensor(sequence, dtype=torch.long, device=device),
        spans=tuple(spans),
        examples=n,
        num_sequences=2 * n if with_rejected else n,
        tokens=real,
        padding=len(rows) * width - real,
    )


def _sees(batch: PackedBatch, window: int | None, b, q, k) -> torch.Tensor:
    """May token q of row b attend to token k (within `window` positions, for a sliding-window layer)?
    FlexAttention's mask_mod, and, on broadcast index tensors, the dense mask: one predicate for both."""
    branch, part = batch.branch, batch.part
    query_branch, key_branch = branch[b, q], branch[b, k]
    own_target = (key_branch == query_branch) & ((part[b, k] == 0) | (part[b, k] == part[b, q]))
    padding = query_branch < 0  # a pad's output is never read: it sees what precedes it, and itself (no NaN)
    sees = ((k <= q) & (key_branch >= 0) & ((key_branch == 0) | own_target | padding)) | ((q == k) & padding)
    if window is None:
        return sees
    # Counted in positions, as each completion would sit after its prompt alone (a query's minus a key's).
    return sees & (batch.position_ids[b, q] - batch.position_ids[b, k] < window)


def packed_attention(device: torch.device | str) -> str:
    """The attention kernel to load a model with that runs packed rows on `device`: FlexAttention on CUDA
    (its BlockMask skips fully masked blocks), SDPA elsewhere."""
    return "flex_attention" if torch.device(device).type == "cuda" else "sdpa"


def packed_attention_mask(batch: PackedBatch, block: bool = False, window: int | None = None):
    """The batch's attention mask, built on its device from the segment ids: a FlexAttention BlockMask
    (`block`), else a dense (B, 1, L, L) boolean for SDPA (True = may attend); cut to `window` positions."""
    rows, width = batch.input_ids.shape
    device = batch.input_ids.device
    if block:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return _sees(batch, window, b, q, k)

        return create_block_mask(mask_mod, rows, None, width, width, device=device)
    index = torch.arange(width, device=device)
    b = torch.arange(rows, device=device)[:, None, None]
    return _sees(batch, window, b, index[None, :, None], index[None, None, :]).unsqueeze(1)


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
    """The packed mask as the decoder takes it: with sliding-window layers, cut to their window — one mask
    when every layer slides (Mistral), a {layer type: mask} dict when some do (Qwen2, Gemma)."""
    block = config._attn_implementation == "flex_attention"
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if window is None or (types and "sliding_attention" not in types):
        return packed_attention_mask(batch, block)
    windowed = packed_attention_mask(batch, block, window)
    if not types or types == {"sliding_attention"}:
        return windowed
    return {"full_attention": packed_attention_mask(batch, block), "sliding_attention": windowed}


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
    """The plain path, the one `packed_logps` is tested against: prompt+chosen and prompt+rejected as separate
    right-padded rows through the model's own forward, full logits, then each completion's log-probs summed."""
    ids = batch.input_ids
    rows = [torch.cat([ids[g, :S], ids[g, start : start + P + C]]) for g, S, start, P, C, _ in batch.spans]
    if batch.num_sequences > batch.examples:  # with rejected
        rows += [torch.cat([ids[g, :S], ids[g, start : start + P], ids[g, start + P + C : start + P + C + R]])
                 for g, S, start, P, C, R in batch.spans]  # fmt: skip
    starts = [S + P for _, S, _, P, _, _ in batch.spans] * (len(rows) // batch.examples)
    # Padding is masked and unlabelled: any id will do.
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for i, (row, start) in enumerate(zip(rows, starts)):
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

    The rows of one shot set (by `shots_length`, when the batch has it) go into one packed row; shot sets
    run shortest first, about `rows_per_forward` rows a forward, so little of a forward is padding. The
    output keeps the input's row order.
    """

    def __init__(self, models: dict[str, str], dtype: str = "auto", rows_per_forward: int = 8):
        # Here, not at the top: packing needs torch alone (benchmarks/gpu_step.py runs it on a bare GPU box).
        from fspo_ray.models import load_for_inference, padding_id

        attention = packed_attention("cuda" if torch.cuda.is_available() else "cpu")
        loaded: dict[str, object] = {}
        self.models = {}
        for name, path in models.items():  # one copy of a model scored under two names
            if path not in loaded:
                loaded[path], self.tokenizer, self.device = load_for_inference(path, dtype, attention=attention)
            self.models[name] = loaded[path]
        self.pad_id = padding_id(self.tokenizer)
        self.rows_per_forward = rows_per_forward

    def __call__(self, batch: dict) -> dict:
        n = len(batch["prompt_ids"])
        shots_lengths = batch.get(SHOTS_LENGTH)
        groups = shot_set_groups(batch["prompt_ids"], shots_lengths)
        shared = [int(shots_lengths[g[0]]) if shots_lengths is not None else 0 for g in groups]
        width = [sum(len(batch[c][i]) for c in TOKEN_COLUMNS for i in g) - (len(g) - 1) * s
                 for g, s in zip(groups, shared)]  # fmt: skip
        scores = {f"{name}_{side}": [0.0] * n for name in self.models for side in ("chosen", "rejected")}
        rows: list[int] = []
        for k, g in enumerate(sorted(range(len(groups)), key=width.__getitem__)):
            rows += groups[g]
            if len(rows) < self.rows_per_forward and k < len(groups) - 1:
                continue
            lengths = [shots_lengths[i] for i in rows] if shots_lengths is not None else None
            packed = pack(*([batch[c][i] for i in rows] for c in TOKEN_COLUMNS), self.pad_id, self.device, lengths)
            for name, model in self.models.items():
                with torch.no_grad():
                    logps = packed_logps(model, packed).tolist()
                for j, i in enumerate(rows):
                    scores[f"{name}_chosen"][i], scores[f"{name}_rejected"][i] = logps[j], logps[len(rows) + j]
            rows = []
        return {**batch, **scores}
