"""The shared-prompt (packed) log-probs against the plain concatenated path and a per-sequence forward."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fspo_ray.logprobs import concatenated_logps, pack, packed_logps

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
        plain = concatenated_logps(model, PROMPTS, CHOSEN, REJECTED, pad_token_id=0)
    assert packed.shape == (8,)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=0)
    expected = [_one_by_one(model, p, c) for p, c in zip(PROMPTS, CHOSEN)]
    expected += [_one_by_one(model, p, r) for p, r in zip(PROMPTS, REJECTED)]
    torch.testing.assert_close(packed.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


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
        lambda m: concatenated_logps(m, PROMPTS, CHOSEN, REJECTED, pad_token_id=0),
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
