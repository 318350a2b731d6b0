"""The shared-prompt (packed) log-probs against the plain path and a per-sequence forward, for every model
family the packed path knows, and the plain path taken for one it does not."""

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from fspo_ray.logprobs import pack, pack_branches, packed_logps, plain_logps

# Mixed prompt lengths (a 1-token "0-shot" prompt among them), completions of different lengths,
# chosen longer than rejected and the other way round.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3, 4, 5, 6]]
CHOSEN = [[20, 21, 22, 1], [23, 1], [24, 25, 26, 27, 28, 29, 1], [30, 1]]
REJECTED = [[31, 1], [32, 33, 34, 35, 36, 1], [37, 38, 1], [39, 40, 41, 1]]


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


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_each_familys_own_forward(family, caplog):
    model = _family(family)
    layer_types = set(getattr(model.config, "layer_types", None) or ())
    window = getattr(model.config, "sliding_window", None)
    if family in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        assert layer_types == {"full_attention", "sliding_attention"} and window == 5, (layer_types, window)
    if family == "mistral":
        assert window == 5
    with caplog.at_level(logging.WARNING, logger="fspo_ray.logprobs"), torch.no_grad():
        packed = packed_logps(model, pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0))
    assert not [r for r in caplog.records if r.name == "fspo_ray.logprobs"], "the packed path was not taken"
    expected = [_one_by_one(model, p, c) for p, c in zip(PROMPTS, CHOSEN)]
    expected += [_one_by_one(model, p, r) for p, r in zip(PROMPTS, REJECTED)]
    torch.testing.assert_close(packed.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_a_family_the_packed_path_does_not_know_is_scored_by_its_own_forward(caplog):
    from fspo_ray.logprobs import _packs

    _packs.cache_clear()  # the warning comes once per process and family
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=48, n_embd=64, n_layer=2, n_head=4,
                                                                 attn_implementation="sdpa")).eval()  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fspo_ray.logprobs"), torch.no_grad():
        got = packed_logps(model, pack(PROMPTS, CHOSEN, REJECTED, pad_token_id=0))
        packed_logps(model, pack(PROMPTS, CHOSEN, None, pad_token_id=0))
    assert [r.getMessage() for r in caplog.records if r.name == "fspo_ray.logprobs"] == [
        "model type 'gpt2': the packed forward knows llama, mistral, qwen2, qwen3, gemma2, gemma3_text, granite, "
        "cohere; scoring through the model's own forward instead (each prompt computed twice)"
    ]
    expected = [_one_by_one(model, p, c) for p, c in zip(PROMPTS, CHOSEN)]
    expected += [_one_by_one(model, p, r) for p, r in zip(PROMPTS, REJECTED)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


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
    visible = batch.attention_mask[0, 0].int().tolist()
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
    assert two.attention_mask[1, 0, 3:, 3:].int().tolist() == [[1, 0], [0, 1]]  # of the pads, each sees itself only
    assert not two.attention_mask[1, 0, :3, 3:].any()  # no real token sees a pad


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        pack([[5], []], [[6], [6]], None, pad_token_id=0)


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
