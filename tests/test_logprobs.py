"""The shared-prompt (packed) log-probs against the plain path and a per-sequence forward, for every model
family the packed path knows, and the plain path taken for one it does not; rows of one shot set packed
together against the same episodes packed alone; FlexAttention's block mask against the dense one."""

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from fspo_ray.attention import BRANCH_ATTENTION, packed_attention, packed_attention_mask
from fspo_ray.logprobs import pack, pack_branches, packed_logps, plain_logps, share_shots

# Mixed prompt lengths (a 1-token "0-shot" prompt among them), completions of different lengths,
# chosen longer than rejected and the other way round.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3, 4, 5, 6]]
CHOSEN = [[20, 21, 22, 1], [23, 1], [24, 25, 26, 27, 28, 29, 1], [30, 1]]
REJECTED = [[31, 1], [32, 33, 34, 35, 36, 1], [37, 38, 1], [39, 40, 41, 1]]

# Two shot sets and a lone episode: shots [5..11] shared by rows 0, 2, 3; shots [9, 8, 7] by rows 4, 5.
SHOTS_A, SHOTS_B = [5, 6, 7, 8, 9, 10, 11], [9, 8, 7]
SET_PROMPTS = [SHOTS_A + [12, 13], [3, 4], SHOTS_A + [14, 15, 16], SHOTS_A + [17], SHOTS_B + [12], SHOTS_B + [13, 14]]
SET_SHOTS = [7, 0, 7, 7, 3, 3]
SET_CHOSEN = [[20, 21, 1], [22, 1], [23, 24, 25, 26, 1], [27, 1], [28, 29, 1], [30, 1]]
SET_REJECTED = [[31, 1], [32, 33, 34, 1], [35, 1], [36, 37, 38, 1], [39, 1], [40, 41, 42, 1]]
# The same models score both: episodes each in its own row, and shot sets packed K targets to a row.
LAYOUTS = {"alone": (PROMPTS, CHOSEN, REJECTED, None), "shot sets": (SET_PROMPTS, SET_CHOSEN, SET_REJECTED, SET_SHOTS)}


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, attn_implementation="sdpa", tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def _one_by_one(model, prompt, completion):
    """Σ log p(completion_t | prompt, completion_<t) from one unpadded forward of this sequence alone."""
    tokens = list(prompt) + list(completion)
    with torch.no_grad():
        logps = F.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].double(), -1)
    return sum(logps[len(prompt) + t - 1, token].item() for t, token in enumerate(completion))


@pytest.mark.parametrize("tied", [True, False])
def test_packed_equals_concatenated_and_a_forward_per_sequence(tied):
    model = _model(tie_word_embeddings=tied)
    with torch.no_grad():
        packed = packed_logps(model, pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0))
        plain = plain_logps(model, pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0))
    assert packed.shape == (8,)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=0)
    expected = [_one_by_one(model, p, c) for p, c in zip(PROMPTS, CHOSEN)]
    expected += [_one_by_one(model, p, r) for p, r in zip(PROMPTS, REJECTED)]
    torch.testing.assert_close(packed.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


# Tiny random configs, built here, of the families whose *ForCausalLM does more than the LM head (soft-capping,
# logit scaling) or whose layers attend through a sliding window smaller than these rows (up to 21 tokens).
SMALL = dict(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=5, final_logit_softcapping=0.5,
                                                          attn_logit_softcapping=None, query_pre_attn_scalar=16)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=5, final_logit_softcapping=0.5,
                                                                   query_pre_attn_scalar=16, sliding_window_pattern=2)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=3.0)),
}


def _family(name, **overrides):
    config_class, model_class, extra = FAMILIES.get(name, (None, None, {}))
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SMALL, **extra, **overrides})
    return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_each_familys_own_forward(family, layout, caplog):
    prompts, chosen, rejected, shots = LAYOUTS[layout]
    model = _family(family)
    layer_types = set(getattr(model.config, "layer_types", None) or ())
    window = getattr(model.config, "sliding_window", None)
    if family in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        assert layer_types == {"full_attention", "sliding_attention"} and window == 5, (layer_types, window)
    if family == "mistral":
        assert window == 5
    with caplog.at_level(logging.WARNING, logger="fspo_ray.logprobs"), torch.no_grad():
        packed = packed_logps(model, pack(prompts, chosen, rejected, pad_token_id=0, shots_lengths=shots))
    assert not [r for r in caplog.records if r.name == "fspo_ray.logprobs"], "the packed path was not taken"
    expected = [_one_by_one(model, p, c) for p, c in zip(prompts, chosen)]
    expected += [_one_by_one(model, p, r) for p, r in zip(prompts, rejected)]
    torch.testing.assert_close(packed.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_family_the_packed_path_does_not_know_is_scored_by_its_own_forward(layout, caplog):
    from fspo_ray.logprobs import _packs

    prompts, chosen, rejected, shots = LAYOUTS[layout]
    _packs.cache_clear()  # the warning comes once per process and family
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=48, n_embd=64, n_layer=2, n_head=4,
                                                                 attn_implementation="sdpa")).eval()  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fspo_ray.logprobs"), torch.no_grad():
        got = packed_logps(model, pack(prompts, chosen, rejected, pad_token_id=0, shots_lengths=shots))
        chosen_only = packed_logps(model, pack(prompts, chosen, None, pad_token_id=0, shots_lengths=shots))
    assert [r.getMessage() for r in caplog.records if r.name == "fspo_ray.logprobs"] == [
        "model type 'gpt2': the packed forward knows llama, mistral, qwen2, qwen3, gemma2, gemma3_text, granite, "
        "cohere; scoring through the model's own forward instead (each prompt computed twice)"
    ]
    expected = [_one_by_one(model, p, c) for p, c in zip(prompts, chosen)]
    expected += [_one_by_one(model, p, r) for p, r in zip(prompts, rejected)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(chosen_only, got[: len(prompts)], rtol=1e-5, atol=0)


def test_completion_order_does_not_matter():
    model = _model()
    with torch.no_grad():
        forward = packed_logps(model, pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0))
        swapped = packed_logps(model, pack(PROMPTS, REJECTED, CHOSEN, pad_token_id=0))
    torch.testing.assert_close(swapped, torch.cat([forward[4:], forward[:4]]), rtol=1e-5, atol=0)


def test_chosen_only_rows_equal_the_chosen_half():
    model = _model()
    with torch.no_grad():
        both = packed_logps(model, pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0))
        chosen_only = packed_logps(model, pack(PROMPTS, CHOSEN, None, pad_token_id=0))
    assert chosen_only.shape == (4,)
    torch.testing.assert_close(chosen_only, both[:4], rtol=1e-5, atol=0)


def test_gradients_equal_the_plain_path():
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 0.25, -0.5])
    grads = []
    for logps_of in (
        lambda m: packed_logps(m, pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0)),
        lambda m: plain_logps(m, pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0)),
    ):
        model = _model().train()
        (logps_of(model) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_layout_positions_mask_and_padding():
    batch = pack([[5, 6]], [[7, 8]], [[9]], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # rejected restarts at the prompt's end
    visible = packed_attention_mask(batch)[0, 0].int().tolist()
    assert visible == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # rejected sees the prompt and itself, never chosen
    ]
    # token 7 is predicted at 6 (index 1), 8 at 7 (2); 9 at the prompt's end (1), not after chosen
    assert batch.source.tolist() == [1, 2, 1] and batch.target.tolist() == [7, 8, 9]
    assert batch.sequence.tolist() == [0, 0, 1]
    two = pack([[5, 6, 7], [5]], [[8], [8]], [[9], [9]], pad_token_id=0)
    assert (two.tokens, two.padding) == (8, 2)
    mask = packed_attention_mask(two)
    assert mask[1, 0, 3:, 3:].int().tolist() == [[1, 0], [0, 1]]  # of the pads, each sees itself only
    assert not mask[1, 0, :3, 3:].any()  # no real token sees a pad


def test_layout_of_one_shot_set_with_two_targets():
    # shots [5, 6]; target 1: prompt [7], chosen [10], rejected [13]; target 2: prompt [8, 9], [11, 12], [14]
    batch = pack([[5, 6, 7], [5, 6, 8, 9]], [[10], [11, 12]], [[13], [14]], pad_token_id=0, shots_lengths=[2, 2])
    assert batch.input_ids.tolist() == [[5, 6, 7, 10, 13, 8, 9, 11, 12, 14]]  # the shots once
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 3, 2, 3, 4, 5, 4]]  # each target restarts after the shots
    assert packed_attention_mask(batch)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # target 1's prompt: the shots and itself
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0, 0, 0, 0],  # rejected 1: not chosen 1
        [1, 1, 0, 0, 0, 1, 0, 0, 0, 0],  # target 2 never sees target 1
        [1, 1, 0, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 0, 0, 1],
    ]
    # chosen i → i, rejected i → 2 + i; each answer's first token predicted at its own prompt's last token
    assert batch.sequence.tolist() == [0, 2, 1, 1, 3] and batch.target.tolist() == [10, 13, 11, 12, 14]
    assert batch.source.tolist() == [2, 2, 6, 7, 6]
    assert (batch.examples, batch.tokens, batch.padding) == (2, 10, 0)


def test_shot_sets_pack_into_one_row_each():
    batch = pack(SET_PROMPTS, SET_CHOSEN, SET_REJECTED, pad_token_id=0, shots_lengths=SET_SHOTS)
    assert batch.input_ids.shape[0] == 3 and batch.examples == 6 and batch.num_sequences == 12
    alone = pack(SET_PROMPTS, SET_CHOSEN, SET_REJECTED, pad_token_id=0)
    assert batch.tokens == alone.tokens - 2 * len(SHOTS_A) - len(SHOTS_B)  # each shot set's shots computed once


@pytest.mark.parametrize("with_rejected", [True, False])
def test_shot_set_rows_equal_separate_episodes_values_and_gradients(with_rejected):
    """A row per shot set scores each target exactly as its own episode (today's K=1 row) and as the plain
    path does, and gives the same gradients."""
    rejected = SET_REJECTED if with_rejected else None
    weights = torch.linspace(-2.0, 3.0, 12 if with_rejected else 6)
    results = []
    for logps_of in (
        lambda m: packed_logps(m, pack(SET_PROMPTS, SET_CHOSEN, rejected, 0, shots_lengths=SET_SHOTS)),
        lambda m: packed_logps(m, pack(SET_PROMPTS, SET_CHOSEN, rejected, 0)),
        lambda m: plain_logps(m, pack(SET_PROMPTS, SET_CHOSEN, rejected, 0, shots_lengths=SET_SHOTS)),
    ):
        model = _model().train()
        logps = logps_of(model)
        (logps * weights).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (shared, shared_grads), *others = results
    expected = [_one_by_one(_model(), p, c) for p, c in zip(SET_PROMPTS, SET_CHOSEN)]
    expected += [_one_by_one(_model(), p, r) for p, r in zip(SET_PROMPTS, SET_REJECTED)] if with_rejected else []
    torch.testing.assert_close(shared.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    for values, grads in others:
        torch.testing.assert_close(shared, values, rtol=1e-5, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        pack([[5], []], [[6], [6]], None, pad_token_id=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_flex_attention_block_mask_equals_the_dense_mask(family):
    """The CUDA path (FlexAttention with a BlockMask built from the same segment ids), run on the CPU: rows
    long enough that whole 128-token blocks are skipped score as the dense SDPA path does; for Qwen2, with
    a sliding-window layer beside a full one (a BlockMask per layer type)."""
    import random

    rng = random.Random(0)
    shots = [rng.randrange(2, 48) for _ in range(150)]
    prompts = [shots + [rng.randrange(2, 48) for _ in range(n)] for n in (40, 3, 60)]
    chosen = [[rng.randrange(2, 48) for _ in range(n)] + [1] for n in (50, 90, 7)]
    rejected = [[rng.randrange(2, 48) for _ in range(n)] + [1] for n in (30, 5, 80)]
    prompts.append([7] * 20)  # a lone episode: a second, shorter row with padding
    chosen.append([8, 1])
    rejected.append([9, 9, 1])
    batch = pack(prompts, chosen, rejected, pad_token_id=0, shots_lengths=[150, 150, 150, 0])
    block_mask = packed_attention_mask(batch, block=True)
    assert block_mask.sparsity() > 0  # the third target's queries skip the first target's key blocks
    scores = []
    for attention in ("sdpa", "flex_attention"):  # FlexAttention has no backward on CPUs: values only here
        model = _family(family)
        model.set_attn_implementation(attention)
        with torch.no_grad():
            scores.append(packed_logps(model, batch))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-5, atol=0)


# Evaluation's rows: one prompt read once, branches that keep its first `cut` tokens and add a tail of their own
# (the k-shot prompts of one episode), each with the same chosen and rejected completions. Cuts at 0 (a
# tail-only prompt), mid-prompt, and the whole prompt (no tail); a second row of a different width.
TRUNK = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
BRANCH_ROWS = [
    (TRUNK, [(0, [40, 41], [20, 21, 1], [31, 1]), (4, [42], [20, 21, 1], [31, 1]), (10, [], [20, 21, 1], [31, 1])]),
    ([7, 8], [(1, [43, 44, 45], [22, 1], [32, 33, 1])]),
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])  # and with a 5-token window, in positions
def test_branches_equal_each_prompt_alone(family):
    model = _family(family)
    with torch.no_grad():
        packed = packed_logps(model, pack_branches(BRANCH_ROWS, pad_token_id=0))
        plain = plain_logps(model, pack_branches(BRANCH_ROWS, pad_token_id=0))
    branches = [(p[:cut] + tail, c, r) for p, bs in BRANCH_ROWS for cut, tail, c, r in bs]
    expected = [_one_by_one(model, prompt, c) for prompt, c, _ in branches]
    expected += [_one_by_one(model, prompt, r) for prompt, _, r in branches]
    torch.testing.assert_close(packed.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=0)


def test_rows_as_ray_data_hands_them_numpy_arrays_pack_the_same():
    import numpy as np

    as_arrays = [[np.array(x) for x in column] for column in (PROMPTS, CHOSEN, REJECTED)]
    for got, want in ((pack(*as_arrays, pad_token_id=0), pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0)),
                      (pack(*as_arrays[:2], None, pad_token_id=0), pack(PROMPTS, CHOSEN, None, pad_token_id=0))):
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.attention_mask, want.attention_mask)
        assert torch.equal(got.source, want.source) and got.plain == want.plain


def test_branch_layout_positions_and_mask():
    batch = pack_branches([([5, 6, 7], [(1, [8], [9], [10]), (3, [], [11], [12])])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 1, 2, 2, 3, 3]]
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0, 0],  # the first branch's tail sees the prompt's first token only
        [1, 0, 0, 1, 1, 0, 0, 0],  # its chosen: that token, the tail, itself
        [1, 0, 0, 1, 0, 1, 0, 0],  # its rejected: the same, never chosen
        [1, 1, 1, 0, 0, 0, 1, 0],  # the second branch keeps the whole prompt and has no tail
        [1, 1, 1, 0, 0, 0, 0, 1],
    ]
    # chosen 9 is predicted at the tail (index 3), rejected 10 there too; 11 and 12 at the prompt's end (2)
    assert batch.source.tolist() == [3, 3, 2, 2] and batch.target.tolist() == [9, 10, 11, 12]
    assert batch.sequence.tolist() == [0, 2, 1, 3]  # chosen of branch j is j, its rejected 2 + j


def test_the_k_shot_branches_of_a_shot_sets_targets_share_one_row():
    """Evaluation's rows (a target's k-shot prompts as branches of its longest) for two targets that begin
    with the same shots merge into one row, the shots once; every branch keeps its own tokens and scores."""
    shots = [5, 6, 7, 8, 9, 10]
    first = [(0, [11, 12], [20, 1], [21, 1]), (3, [11, 12], [20, 1], [21, 1]), (8, [], [20, 1], [21, 1])]
    second = [(0, [13], [22, 1], [23, 1]), (3, [13], [22, 1], [23, 1]), (7, [], [22, 1], [23, 1])]
    rows = [(shots + [11, 12], first), (shots + [13], second)]
    groups, merged = share_shots(rows, [6, 6])
    assert groups == [[0, 1]] and [list(p) for p, _ in merged] == [shots]
    assert [(cut, list(tail)) for cut, tail, _, _ in merged[0][1]] == [
        (0, [11, 12]), (3, [11, 12]), (6, [11, 12]), (0, [13]), (3, [13]), (6, [13])]  # fmt: skip
    model = _family("llama")
    with torch.no_grad():
        together = packed_logps(model, pack_branches(merged, pad_token_id=0))
        apart = packed_logps(model, pack_branches(rows, pad_token_id=0))
    assert pack_branches(merged, 0).tokens == pack_branches(rows, 0).tokens - len(shots)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=0)
    assert share_shots(rows, [6, 5])[0] == [[0], [1]]  # other shots: a row each


def _keys_seen(batch):
    """{flat query index: the flat key indices it may attend} of every real token, under the per-branch layout:
    the prompts causally, each branch's slots through its own mask."""
    layout, width = batch.branch_layout, batch.input_ids.shape[1]
    seen = {}
    for row, length in enumerate(batch.prompt_lengths):
        for q in range(length):
            seen[row * width + q] = {row * width + k for k in range(q + 1)}
    real = set(layout.real.tolist())
    for n, (queries, keys) in enumerate(zip(layout.queries.tolist(), layout.keys.tolist())):
        for slot, q in enumerate(queries):
            if n * len(queries) + slot in real:
                seen[q] = {k for k, sees in zip(keys, layout.mask[n, 0, slot].tolist()) if sees}
    return seen


@pytest.mark.parametrize("layout", [*LAYOUTS, "branches"])
def test_the_per_branch_layout_lets_each_token_see_what_the_dense_mask_does(layout):
    """branch_attention.py's index tensors and small masks, against the dense mask every other path uses: each
    real token sees the same keys; padding is never a query there and never a key anyone sees."""
    if layout == "branches":
        batch = pack_branches(BRANCH_ROWS, pad_token_id=0)
    else:
        prompts, chosen, rejected, shots = LAYOUTS[layout]
        batch = pack(prompts, chosen, rejected, pad_token_id=0, shots_lengths=shots)
    width, dense = batch.input_ids.shape[1], batch.attention_mask[:, 0]
    real = [(b, q) for b in range(dense.shape[0]) for q in range(width) if batch.segment[b, q] != -1]
    want = {b * width + q: {b * width + k for k in dense[b, q].nonzero().flatten().tolist()} for b, q in real}
    assert _keys_seen(batch) == want


@pytest.mark.parametrize("layout", [*LAYOUTS, "branches"])
@pytest.mark.parametrize("with_rejected", [True, False])
def test_attention_per_branch_equals_the_dense_mask_values_and_gradients(layout, with_rejected):
    """The CPU kernel (packed_attention('cpu')) per branch against SDPA over the dense mask, on the same weights:
    log-probs and every parameter's gradient, with grouped KV heads, padding rows and, for evaluation's rows,
    branches cut at 0, mid-prompt and the whole prompt. Called without a branch layout (generation), it is
    SDPA's own path to the bit."""

    assert packed_attention("cpu") == BRANCH_ATTENTION
    if layout == "branches":
        rows = [(p, [(cut, t, c, r if with_rejected else None) for cut, t, c, r in bs]) for p, bs in BRANCH_ROWS]
        batches = [pack_branches(rows, pad_token_id=0) for _ in range(2)]
    else:
        prompts, chosen, rejected, shots = LAYOUTS[layout]
        rejected = rejected if with_rejected else None
        batches = [pack(prompts, chosen, rejected, pad_token_id=0, shots_lengths=shots) for _ in range(2)]
    results, logits = [], []
    for attention, batch in zip(("sdpa", BRANCH_ATTENTION), batches):
        model = _model().train()
        model.set_attn_implementation(attention)
        logps = packed_logps(model, batch)
        logps.sum().backward()
        results.append((logps.detach(), [p.grad for p in model.parameters()]))
        with torch.no_grad():  # a plain causal forward, as generation runs it
            logits.append(model(input_ids=batch.input_ids).logits)
    assert "branch_layout" in vars(batches[1]) and "branch_layout" not in vars(batches[0])  # the path each took
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(logits[1], logits[0])


def test_branches_outside_the_prompt_or_mixed_are_refused():
    with pytest.raises(ValueError, match="row 0: a branch cuts the prompt at 4, outside its 3 tokens"):
        pack_branches([([5, 6, 7], [(4, [], [9], [10])])], pad_token_id=0)
    with pytest.raises(ValueError, match="every branch needs a rejected completion, or none does"):
        pack_branches([([5, 6, 7], [(1, [], [9], [10]), (2, [], [9], None)])], pad_token_id=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_mask_built_on_the_gpu_equals_the_one_built_on_the_cpu():
    rows = [(p, [(len(p) - 1, p[-1:], c, r), (1, [7, 8], r, c)]) for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    for got, want in ((pack(PROMPTS, CHOSEN, REJECTED, 0, "cuda"), pack(PROMPTS, CHOSEN, REJECTED, 0)),
                      (pack_branches(rows, 0, "cuda"), pack_branches(rows, 0))):
        assert got.attention_mask.device.type == "cuda"
        assert torch.equal(got.attention_mask.cpu(), want.attention_mask)
        assert torch.equal(got.position_ids.cpu(), want.position_ids) and got.plain == want.plain
