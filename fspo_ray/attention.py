"""How packed rows attend: the mask every path shares, and the kernel each device runs it with.

A packed row (logprobs.py) is a prompt and then branches: each branch's tail and completions see the first
`cut` tokens of the prompt and themselves (causally; rejected never sees chosen), never another branch.
One predicate says who sees whom (`may_attend`), built on the model's device from the rows' segment ids:
a FlexAttention `BlockMask` on CUDA, which skips the blocks a query never sees, or a dense (B, 1, L, L)
boolean for SDPA.

Over a whole row, the dense mask makes SDPA score every query against every key and throw most of it away:
a training row of 6 shots and 4 targets is ~650 tokens, of which each target's ~85 see ~385; an evaluation
row (4 targets, each at 5 shot counts) is ~2,000 tokens, each branch seeing ~400. FlexAttention has no
backward on CPUs; there attention runs per branch instead (`branch_attention`), two SDPA calls a layer:

- the prompts, causally, over the rows' first `prompt_width` tokens;
- every branch of the batch as a row of its own: its queries against its prompt keys (the first `cut`) and
  its own keys, under a small mask.

Each query sees exactly the keys the dense mask lets it see, so the outputs are equal up to rounding
(tests/test_logprobs.py holds values and gradients to the dense path's). Models are loaded with
`attn_implementation=BRANCH_ATTENTION` (registered with transformers here); called without a layout
(sliding-window layers, which keep the dense mask cut to their window, or generation) it is transformers'
own SDPA, to the bit.

Every packed forward of a model loaded with `packed_attention("cpu")` runs per branch: evaluation's rows
(an episode's k-shot prompts for each of a shot set's targets) in half the time, a K=4 training row's forward
and backward in 18% less (840 tokens, fp32, one thread, an AMD EPYC), the reference pass's batches in 4-20%
less. The rounding differs from the dense mask's, so a run trains another model than it did under the dense
mask: the demo's results over trajectories are in docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

BRANCH_ATTENTION = "fspo_branches"
# A `batch` below is a logprobs.PackedBatch, read by its fields (logprobs builds on this module, not the reverse).

# One branch of a packed row: (row, cut, start, tail, chosen, rejected): it sees the row's first `cut` tokens;
# its tail, chosen and rejected tokens (counts) follow each other from column `start`.
Span = tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class BranchLayout:
    prompt_width: int  # the longest prompt: the rows' first columns the causal pass covers
    prompts: torch.Tensor  # (P,) flat index into B·L of each prompt token
    prompt_slots: torch.Tensor  # (P,) ... and into B·prompt_width, where the causal pass leaves its output
    queries: torch.Tensor  # (N, Q) flat index into B·L of branch n's tokens (its first, past its end)
    keys: torch.Tensor  # (N, C + Q): its row's first C tokens, then its own (`queries`)
    mask: torch.Tensor  # (N, 1, Q, C + Q) bool, True = may attend
    real: torch.Tensor  # (R,) flat index into N·Q of the query slots that hold a token
    real_tokens: torch.Tensor  # (R,) ... and into B·L, where their output goes


def branch_layout(prompt_lengths: Sequence[int], spans: Sequence[Span], width: int, device) -> BranchLayout:
    """The index tensors and the per-branch mask for a batch of `len(prompt_lengths)` packed rows of `width`."""
    prompt_width = max(prompt_lengths)
    row, cut, start, tail, chosen, rejected = torch.tensor(list(spans), dtype=torch.long).unbind(1)
    length = tail + chosen + rejected
    q_width, c_width = int(length.max()), int(cut.max())
    slot = torch.arange(q_width)[None, :]
    inside = slot < length[:, None]
    queries = row[:, None] * width + start[:, None] + torch.where(inside, slot, 0)
    context = torch.arange(c_width)[None, :]
    keys = torch.cat([row[:, None] * width + torch.where(context < cut[:, None], context, 0), queries], 1)
    # Each slot's part of its branch: 0 tail, 1 chosen, 2 rejected, 3 past the end.
    part = (slot >= tail[:, None]).long() + (slot >= (tail + chosen)[:, None]) + (~inside)
    q_part, k_part = part[:, :, None], part[:, None, :]
    own = (slot.T[None] >= slot[:, None]) & ((k_part == 0) | (k_part == q_part)) & (k_part < 3)
    own |= (q_part == 3) & (slot[:, None] == 0)  # a slot past the end sees its branch's first token: no NaN
    sees_prompt = (context < cut[:, None])[:, None, :].expand(-1, q_width, -1)
    mask = torch.cat([sees_prompt, own], 2).unsqueeze(1)
    lengths = torch.tensor(list(prompt_lengths), dtype=torch.long)
    prompt_row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    prompt_col = torch.cat([torch.arange(n) for n in lengths.tolist()])
    return BranchLayout(
        prompt_width=prompt_width,
        prompts=(prompt_row * width + prompt_col).to(device),
        prompt_slots=(prompt_row * prompt_width + prompt_col).to(device),
        queries=queries.to(device),
        keys=keys.to(device),
        mask=mask.to(device),
        real=inside.flatten().nonzero().squeeze(1).to(device),
        real_tokens=queries.flatten()[inside.flatten()].to(device),
    )


def branch_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, branch_layout=None,
                     **kwargs):  # fmt: skip
    """A transformers attention function: (B, H, L, D) query, key and value to a (B, L, H, D) output. With a
    `branch_layout` (passed to the decoder's forward as a keyword), per branch; else transformers' SDPA."""
    if branch_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    layout = branch_layout
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, heads, width, dim = query.shape
    flat = [x.transpose(1, 2).reshape(batch * width, heads, dim) for x in (query, key, value)]
    n, q_width = layout.queries.shape

    def gather(x, index):
        return x.index_select(0, index.flatten()).view(n, index.shape[1], heads, dim).transpose(1, 2)

    branches = F.scaled_dot_product_attention(gather(flat[0], layout.queries), gather(flat[1], layout.keys),
                                              gather(flat[2], layout.keys), attn_mask=layout.mask, dropout_p=dropout,
                                              scale=scaling)  # fmt: skip
    out = query.new_zeros(batch * width, heads, dim)  # padding's output: never read by a real token
    if p := layout.prompt_width:
        prompts = F.scaled_dot_product_attention(query[:, :, :p], key[:, :, :p], value[:, :, :p], is_causal=True,
                                                 dropout_p=dropout, scale=scaling)  # fmt: skip
        out = out.index_copy(0, layout.prompts, prompts.transpose(1, 2).reshape(-1, heads, dim)[layout.prompt_slots])
    out = out.index_copy(0, layout.real_tokens, branches.transpose(1, 2).reshape(-1, heads, dim)[layout.real])
    return out.view(batch, width, heads, dim), None


def may_attend(batch, window: int | None, b, q, k, visible: torch.Tensor | None = None) -> torch.Tensor:
    """May token q of row b attend to token k (within `window` positions, for a sliding-window layer)? What its
    segment sees, causally; a padding token sees itself alone (no NaN, never read). FlexAttention's mask_mod and,
    on broadcast index tensors, the dense mask: one predicate for both. `visible`: `sees` read at
    (b, 1 + q's segment, k), where the caller has it already."""
    if visible is None:
        visible = batch.sees[b, batch.segment[b, q] + 1, k]
    # q == k at a padding key: a padding query's diagonal (read at the key, a broadcast the dense mask pays little for).
    allowed = (visible & (k <= q)) | ((q == k) & (batch.segment[b, k] == -1))
    if window is None:
        return allowed
    # Counted in positions, as each completion would sit after its prompt alone (the query's minus the key's).
    return allowed & (batch.position_ids[b, q] - batch.position_ids[b, k] < window)


def packed_attention(device: torch.device | str) -> str:
    """The attention kernel to load a model with that runs packed rows on `device`: FlexAttention on CUDA
    (its BlockMask skips fully masked blocks), elsewhere SDPA per branch."""
    return "flex_attention" if torch.device(device).type == "cuda" else BRANCH_ATTENTION


def packed_attention_mask(batch, block: bool = False, window: int | None = None):
    """The batch's attention mask, built on its device from the segment ids: a FlexAttention BlockMask
    (`block`), else a dense (B, 1, L, L) boolean for SDPA (True = may attend); cut to `window` positions."""
    rows, width = batch.input_ids.shape
    device = batch.input_ids.device
    if block:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return may_attend(batch, window, b, q, k)

        return create_block_mask(mask_mod, rows, None, width, width, device=device)
    index = torch.arange(width, device=device)
    b = torch.arange(rows, device=device)[:, None]
    # Each query's row of `sees`, copied whole by one index_select: indexing with broadcast tensors reads element
    # by element, ~20x slower on a CPU, and this mask is built every micro-batch.
    picks = batch.segment + 1 + batch.sees.shape[1] * b
    visible = batch.sees.flatten(0, 1).index_select(0, picks.flatten()).view(rows, width, width)
    return may_attend(batch, window, b[..., None], index[None, :, None], index[None, None, :], visible).unsqueeze(1)


def _sliding_window(config) -> int | None:
    """The window of the model's sliding-window layers; None when no layer slides."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    return None if window is None or (types and "sliding_attention" not in types) else window


def _layer_masks(config, batch):
    """The packed mask as the decoder takes it (a BlockMask under FlexAttention): with sliding-window layers,
    cut to their window — one mask when every layer slides (Mistral), a {layer type: mask} dict when some do
    (Qwen2, Gemma)."""
    block = config._attn_implementation == "flex_attention"
    full = packed_attention_mask(batch, block) if block else batch.attention_mask
    window = _sliding_window(config)
    if window is None:
        return full
    windowed = packed_attention_mask(batch, block, window)
    types = set(getattr(config, "layer_types", None) or ())
    if not types or types == {"sliding_attention"}:
        return windowed
    return {"full_attention": full, "sliding_attention": windowed}


def decoder_masks(config, batch) -> dict:
    """What a decoder's forward takes to attend over `batch` as packed. On a model loaded with BRANCH_ATTENTION
    (and no sliding window): the branch layout, as a keyword each layer's attention receives, with its 4-D mask
    (which transformers' mask building passes on untouched); else the layers' dense masks."""
    if config._attn_implementation == BRANCH_ATTENTION and _sliding_window(config) is None:
        return {"attention_mask": batch.branch_layout.mask, "branch_layout": batch.branch_layout}
    return {"attention_mask": _layer_masks(config, batch)}


AttentionInterface.register(BRANCH_ATTENTION, branch_attention)
AttentionMaskInterface.register(BRANCH_ATTENTION, sdpa_mask)  # masks for calls without a layout: SDPA's
