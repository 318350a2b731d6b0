"""Tokenization as the reference does it, and the over-length policy (never cut; drop oldest shots)."""

import pytest

from fspo_ray.data.episodes import Episode
from fspo_ray.data.prompts import Shot
from fspo_ray.data.tokenize import fit_episode, render_episode, tokenize_text
from fspo_ray.models import build_tokenizer


@pytest.fixture(scope="module")
def byte_tokenizer():
    """No merges: one token per UTF-8 byte, so lengths can be computed by hand."""
    tokenizer = build_tokenizer([""], vocab_size=10)
    assert tokenizer("héllo", add_special_tokens=False)["input_ids"].__len__() == len("héllo".encode())
    return tokenizer


EPISODE = Episode(
    "u", tuple(Shot(f"question {i}", f"good {i}", f"bad {i}") for i in range(3)), Shot("last?", "yes", "no!")
)


def test_prompt_and_completions_tokenized_separately_with_eos(byte_tokenizer):
    text = render_episode(EPISODE)
    tokens = tokenize_text(byte_tokenizer, text)
    encode = lambda s: byte_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = encode(text.prompt)
    eos = byte_tokenizer.eos_token_id
    assert tokens["prompt_ids"] == prompt and len(prompt) == len(text.prompt.encode())
    assert tokens["chosen_ids"] == encode("## Preferred Response \nyes\n") + [eos]
    assert tokens["rejected_ids"] == encode("## Preferred Response \nno!\n") + [eos]
    assert set(tokens) == {"prompt_ids", "chosen_ids", "rejected_ids"}  # the prompt is held once
    assert byte_tokenizer.decode(tokens["prompt_ids"] + tokens["chosen_ids"][:-1]) == text.prompt + text.chosen  # no BOS


def test_fits_unchanged_when_within_limits(byte_tokenizer):
    text = render_episode(EPISODE)
    longest = len(text.prompt.encode()) + len(text.rejected.encode()) + 1
    fitted = fit_episode(EPISODE, byte_tokenizer, max_length=longest, max_prompt_length=longest)
    assert fitted.shots_dropped == 0 and fitted.text == text


@pytest.mark.parametrize("dropped", [1, 2, 3])
def test_oldest_shots_dropped_whole_until_it_fits(byte_tokenizer, dropped):
    want = render_episode(EPISODE, shots_dropped=dropped)
    budget = len(want.prompt.encode())  # exactly the prompt with `dropped` shots removed
    fitted = fit_episode(EPISODE, byte_tokenizer, max_length=10_000, max_prompt_length=budget)
    assert fitted.shots_dropped == dropped and fitted.text.shots_used == 3 - dropped
    assert fitted.text == want  # the newest shots kept, in order, untouched
    total = budget + len(want.rejected.encode()) + 1
    by_total = fit_episode(EPISODE, byte_tokenizer, max_length=total, max_prompt_length=10_000)
    assert by_total.shots_dropped == dropped


def test_skipped_when_even_the_query_alone_does_not_fit(byte_tokenizer):
    bare = render_episode(EPISODE, shots_dropped=3)
    assert fit_episode(EPISODE, byte_tokenizer, max_length=10_000, max_prompt_length=len(bare.prompt) - 1) is None
    assert fit_episode(EPISODE, byte_tokenizer, max_length=len(bare.rejected), max_prompt_length=10_000) is None
