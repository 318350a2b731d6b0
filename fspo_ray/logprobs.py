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

Training's episodes come K to a window of one user's shots (`targets_per_prompt`, episodes.py): `pack`
with `shots_lengths` puts the K targets of a shot set in one row, the shots once and each target's task,
question and answers a branch after them (`pack_branches`), so a user's history is read once for K
targets. Evaluation's k-shot prompts of one episode share a row the same way.

We chose one packed row over a prompt forward whose KV cache the two completions extend: transformers
drops the cache under gradient checkpointing, and the mask works the same under every ZeRO stage. The
mask needs an attention kernel that takes arbitrary masks; flash-attention's varlen form cannot express
"rejected skips chosen". A row carries O(L) segment ids, and the mask is made from them on the model's
device (attention.py): FlexAttention on CUDA and SDPA per branch on CPUs skip what a query never sees (one
target's keys for another target's queries).

The LM head and the log-softmax run only at the positions that predict a completion token: a prompt
position never produces a vocabulary-sized row (for a 49k vocabulary that is most of a forward's cost).
That skips the model's own forward, so each family's head rules (soft-capping, logit scaling) are
repeated here (`LOGITS`); a family not listed there is scored through its own forward instead.

In training the policy is a `CompletionLogps` module handed to DeepSpeed, so every forward goes through the
engine: ZeRO-3 counts micro-steps and hooks its backward there (a forward that called the model's
submodules directly made gradient accumulation keep only the last micro-batch).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fspo_ray.attention import BranchLayout, Span, branch_layout, decoder_masks, packed_attention, packed_attention_mask
from fspo_ray.losses import IGNORE_INDEX, sequence_logps

logger = logging.getLogger(__name__)

# The columns a tokenized episode carries: prompt ids, and each completion's ids with its EOS.
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# How many of a tokenized episode's prompt ids are its shots (tokenize.py): what a shot set's targets share.
SHOTS_LENGTH = "shots_length"
# Where a row scores several prompts sharing their start: per prompt, how many of prompt_ids' tokens it
# keeps and the tokens that follow them (see `pack_branches`).
BRANCH_COLUMNS = ("branch_cuts", "branch_tails")
# Raise when the scores this module computes for the same model and tokens change: cached reference
# scores (train/reference.py) are keyed on it.
SCORER_VERSION = 2  # 2: training rows attend per branch on CPUs


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    segment: torch.Tensor  # (B, L): -1 padding, 0 the prompt; branch b: 1 + 3b its tail, 2 + 3b chosen, 3 + 3b rejected
    sees: torch.Tensor  # (B, 1 + S, L) bool: row 1 + s, the keys segment s sees (causally); row 0, padding's: none
    source: torch.Tensor  # (N,) flat index into B·L of the hidden state that predicts each completion token
    target: torch.Tensor  # (N,) the completion token predicted there
    sequence: torch.Tensor  # (N,) which completion the token belongs to: chosen j → j, rejected j → branches + j
    # Per completion, in `sequence`'s numbering: (row, the row's spans that make its plain sequence, where the
    # completion starts in that sequence): what `plain_logps` rebuilds.
    plain: tuple[tuple[int, tuple[tuple[int, int], ...], int], ...]
    examples: int  # branches (episodes): chosen j is j, its rejected examples + j
    num_sequences: int
    tokens: int  # real (non-padding) tokens
    padding: int  # padding tokens
    prompt_lengths: tuple[int, ...]  # each row's prompt
    spans: tuple[Span, ...]  # each branch's place in its row, for attention per branch (attention.py)

    @functools.cached_property
    def attention_mask(self) -> torch.Tensor:
        """(B, 1, L, L) bool, True = may attend: the dense mask SDPA takes, built on the batch's device."""
        return packed_attention_mask(self)

    @functools.cached_property
    def branch_layout(self) -> BranchLayout:
        return branch_layout(self.prompt_lengths, self.spans, self.input_ids.shape[1], self.input_ids.device)


# A branch continues the first `cut` tokens of its row's prompt with `tail` (the rest of its own prompt), then
# scores `chosen` and `rejected` (or `chosen` alone: None) after it.
Branch = tuple[int, Sequence[int], Sequence[int], Sequence[int] | None]
Row = tuple[Sequence[int], Sequence[Branch]]  # a prompt and its branches


def share_shots(rows: Sequence[Row], shots_lengths: Sequence[int] | None) -> tuple[list[list[int]], list[Row]]:
    """(groups, rows): `rows` grouped by the shots their prompts begin with (`shots_lengths[i]` ids: the
    targets of one shot set), in first-seen order, each group merged into one row whose prompt is the shots
    and whose branches are all of its members' (a branch that kept more than the shots now keeps the shots
    and carries the rest in its tail: the same tokens). A row without shots, or alone, stays as it is."""
    keys: dict[object, list[int]] = {}
    for i, (prompt, _) in enumerate(rows):
        shared = int(shots_lengths[i]) if shots_lengths is not None else 0
        keys.setdefault((shared, tuple(prompt[:shared])) if shared else i, []).append(i)
    groups, merged = list(keys.values()), []
    for members in groups:
        if len(members) == 1:
            merged.append(rows[members[0]])
            continue
        shared = int(shots_lengths[members[0]])
        branches = []
        for prompt, own in (rows[i] for i in members):
            for cut, tail, chosen, rejected in own:
                kept = min(cut, shared)
                branches.append((kept, [*prompt[kept:cut], *tail], chosen, rejected))
        merged.append((rows[members[0]][0][:shared], branches))
    return groups, merged


def pack(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]] | None,
    pad_token_id: int,
    device: torch.device | str = "cpu",
    shots_lengths: Sequence[int] | None = None,
) -> PackedBatch:
    """One right-padded row per episode: [prompt | chosen | rejected] (or [prompt | chosen] without rejected).
    With `shots_lengths` (how many of each prompt's ids are its shots), one row per shot set instead: the
    shared shots once, then each target's task and question, chosen and rejected as a branch. Completions
    keep the episodes' numbering either way: chosen i is i, rejected i is n + i."""
    rejected = rejected if rejected is not None else [None] * len(prompts)
    episodes = [(p, [(len(p), (), c, r)]) for p, c, r in zip(prompts, chosen, rejected)]
    groups, rows = share_shots(episodes, shots_lengths)
    batch = pack_branches(rows, pad_token_id, device)
    order = [i for members in groups for i in members]  # the episode behind each branch, in pack_branches' order
    if order == sorted(order):
        return batch
    n = len(order)  # renumber the completions from the branches' order to the episodes'
    number = order + [n + i for i in order] if batch.num_sequences > n else order
    plain: list = [None] * len(number)
    for old, new in enumerate(number):
        plain[new] = batch.plain[old]
    sequence = torch.tensor(number, dtype=torch.long, device=batch.sequence.device)[batch.sequence]
    return dataclasses.replace(batch, sequence=sequence, plain=tuple(plain))


def pack_branches(rows: Sequence[Row], pad_token_id: int, device: torch.device | str = "cpu") -> PackedBatch:
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
    sees = torch.zeros((len(rows), 2 + 3 * max(len(bs) for _, bs in rows), width), dtype=torch.bool)
    source, target, sequence, spans = [], [], [], []
    plain: list = [None] * (2 * n_branches if with_rejected else n_branches)
    j = 0
    for i, (prompt, branches) in enumerate(rows):
        P, at = len(prompt), len(prompt)
        input_ids[i, :P] = torch.tensor(list(prompt), dtype=torch.long)
        position_ids[i, :P], segment[i, :P], sees[i, 1, :P] = torch.arange(P), 0, True
        for b, (cut, tail, chosen, rejected) in enumerate(branches):
            if not 0 <= cut <= P:
                raise ValueError(f"row {i}: a branch cuts the prompt at {cut}, outside its {P} tokens")
            if cut + len(tail) == 0:
                raise ValueError(f"row {i}: empty prompt (a completion's first token needs a position to predict it)")
            tail_segment, context = 1 + 3 * b, cut + len(tail)
            tail_span = (at, at + len(tail))
            spans.append((i, cut, at, len(tail), len(chosen), len(rejected) if with_rejected else 0))
            sees[i, 1 + tail_segment, :cut] = True
            completions = [(chosen, j)] + ([(rejected, n_branches + j)] if with_rejected else [])
            for n, (tokens, seq) in enumerate([(tail, None), *completions]):
                end, start = at + len(tokens), cut if n == 0 else context
                input_ids[i, at:end] = torch.tensor(list(tokens), dtype=torch.long)
                position_ids[i, at:end] = torch.arange(start, start + len(tokens))
                segment[i, at:end] = tail_segment + n
                sees[i, 1 + tail_segment + n, at:end] = True  # itself (causally, by the mask's predicate)
                if n:  # a completion sees what its tail sees, the tail included
                    sees[i, 1 + tail_segment + n] |= sees[i, 1 + tail_segment]
                    # Token t is predicted by the hidden state before it: the context's last for t = 0.
                    last = tail_span[1] - 1 if len(tail) else cut - 1
                    source += [i * width + last] + [i * width + at + t - 1 for t in range(1, len(tokens))]
                    target += list(tokens)
                    sequence += [seq] * len(tokens)
                    plain[seq] = (i, ((0, cut), tail_span, (at, end)), context)
                at = end
            j += 1
    real = int((segment != -1).sum())
    # Only O(B·L) ids go to the device; the (B, L, L) mask is made there (at the paper's 8,192 tokens a batch of 4
    # is 268 MB of booleans), or never, as a BlockMask.
    return PackedBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        segment=segment.to(device),
        sees=sees.to(device),
        source=torch.tensor(source, dtype=torch.long, device=device),
        target=torch.tensor(target, dtype=torch.long, device=device),
        sequence=torch.tensor(sequence, dtype=torch.long, device=device),
        plain=tuple(plain),
        examples=n_branches,
        num_sequences=len(plain),
        tokens=real,
        padding=len(rows) * width - real,
        prompt_lengths=tuple(len(prompt) for prompt, _ in rows),
        spans=tuple(spans),
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


def packed_logps(model, batch: PackedBatch) -> torch.Tensor:
    """Σ log π(completion token | prompt, earlier completion tokens) per completion: (chosen..., rejected...),
    under a Hugging Face causal LM (or PEFT around one); families `LOGITS` does not list go the plain way.
    A model loaded with `packed_attention(device)` attends per branch on CPUs (attention.py)."""
    config = model.config
    if not _packs(config.model_type, bool(getattr(config, "use_bidirectional_attention", False))):
        return plain_logps(model, batch)
    masks = decoder_masks(config, batch)
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **masks
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

    A row is an episode's `TOKEN_COLUMNS`. With `BRANCH_COLUMNS` it holds several prompts that share their
    first tokens (evaluation's k-shot prompts of one episode, see `pack_branches`), scored in one packed row:
    then each score column holds a list, one score per branch. Rows with `SHOTS_LENGTH` that begin with the same
    shots (the K targets of one shot set, in training or evaluation) share one packed row.

    Packed rows are run shortest first in groups of `rows_per_forward`, so little of a forward is padding; the
    output keeps the input's row order.
    """

    def __init__(self, models: dict[str, str], dtype: str = "auto", rows_per_forward: int = 8):
        # Here, not at the top: packing needs torch and transformers alone (benchmarks/gpu_step.py runs it on a bare
        # GPU box).
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
        n, branched = len(batch["prompt_ids"]), BRANCH_COLUMNS[0] in batch
        own = [self._branches(batch, i, branched) for i in range(n)]
        groups, rows = share_shots(own, batch.get(SHOTS_LENGTH))
        owners = [[i for i in members for _ in own[i][1]] for members in groups]  # the input row of each branch
        size = [len(prompt) + sum(len(t) + len(c) + len(r) for _, t, c, r in bs) for prompt, bs in rows]
        order = sorted(range(len(rows)), key=size.__getitem__)
        scores: dict[str, list[list[float]]] = {
            f"{name}_{side}": [[] for _ in range(n)] for name in self.models for side in ("chosen", "rejected")
        }
        for start in range(0, len(rows), self.rows_per_forward):
            group = order[start : start + self.rows_per_forward]
            packed = pack_branches([rows[g] for g in group], self.pad_id, self.device)
            for name, model in self.models.items():
                with torch.no_grad():
                    logps = packed_logps(model, packed).tolist()
                half = len(logps) // 2
                branch_owners = [i for g in group for i in owners[g]]
                for i, chosen, rejected in zip(branch_owners, logps[:half], logps[half:]):
                    scores[f"{name}_chosen"][i].append(chosen)
                    scores[f"{name}_rejected"][i].append(rejected)
        if not branched:
            scores = {column: [values[0] for values in lists] for column, lists in scores.items()}
        return {**batch, **scores}

    @staticmethod
    def _branches(batch: dict, i: int, branched: bool) -> Row:
        prompt, chosen, rejected = (list(batch[c][i]) for c in TOKEN_COLUMNS)
        if not branched:
            return prompt, [(len(prompt), [], chosen, rejected)]
        cuts, tails = (batch[c][i] for c in BRANCH_COLUMNS)
        return prompt, [(int(cut), list(tail), chosen, rejected) for cut, tail in zip(cuts, tails)]
