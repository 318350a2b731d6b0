"""Tokenization as the reference does it, and the over-length policy (never cut; drop oldest shots)."""

import json

import pytest

from fspo_ray.data.episodes import Episode
from fspo_ray.data.prompts import Shot
from fspo_ray.data.tokenize import fit_episode, fit_shot_set, render_episode, tokenize_text
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
    assert set(tokens) == {"prompt_ids", "chosen_ids", "rejected_ids", "shots_length"}  # the prompt is held once
    assert tokens["shots_length"] == text.prompt.index("# Task\n")  # the examples' bytes: the shared part
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


def test_fit_prompt_drops_exactly_what_the_plain_scan_drops():
    """The linear fit (each shot tokenized once, newest first) against the definition: the fewest oldest
    shots dropped so that the whole prompt (its examples, then its task and question) fits. A BPE with
    merges, so tokens do straddle the shots' edges; budgets from 0 to past the whole history, for both prompt styles."""
    import random

    from fspo_ray.data.prompts import build_prompt
    from fspo_ray.data.tokenize import PromptStyle, fit_prompt
    from fspo_ray.models import TINY_CORPUS

    corpus = json.load(open(TINY_CORPUS))
    bpe = build_tokenizer(corpus, vocab_size=1024)
    rng = random.Random(0)
    words = " ".join(corpus).split()

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))

    shots = tuple(Shot(text(), text(), text()) for _ in range(12))

    def length(dropped: int, style: PromptStyle) -> int:
        """The prompt's examples and the rest (task, question) tokenized apart: how prompts are tokenized."""
        prompt = build_prompt(shots[dropped:], "How now?", preferred_only=style.preferred_only)
        cut = prompt.index("# Task\n")
        return sum(len(bpe(part, add_special_tokens=False)["input_ids"]) for part in (prompt[:cut], prompt[cut:]))

    for style in (PromptStyle(), PromptStyle(preferred_only=True)):
        for budget in range(0, length(0, style) + 20, 7):
            plain = next((d for d in range(len(shots) + 1) if length(d, style) <= budget), None)
            fitted = fit_prompt(shots, "How now?", bpe, budget, style=style)
            assert (fitted[1] if fitted else None) == plain, budget
            if fitted:
                assert len(fitted[0]) == length(plain, style) <= budget


def test_a_shot_sets_targets_drop_the_same_shots_and_equal_their_own_episodes(byte_tokenizer):
    """The targets of one shot set are fitted to the shots the longest of them keeps; each then has exactly
    the tokens of its own episode with those shots (what K=1 packs), and all begin with the same ids."""
    shots = tuple(Shot(f"question {i}", f"good {i}", f"bad {i}") for i in range(3))
    longer = "a much longer question " + "than the other one " * 8 + "?"
    queries = [Shot("short?", "yes", "no"), Shot(longer, "yes", "no")]
    targets = [Episode("u", shots, q, shot_set="u/0/0", episode_id=f"u/0/0/{j}") for j, q in enumerate(queries)]
    longest = render_episode(targets[1], shots_dropped=1)
    limits = dict(max_length=10_000, max_prompt_length=len(longest.prompt.encode()))
    assert fit_episode(targets[0], byte_tokenizer, **limits).shots_dropped == 0  # alone it keeps every shot
    fitted = fit_shot_set(targets, byte_tokenizer, **limits)
    assert [f.shots_dropped for f in fitted] == [1, 1]
    for target, f in zip(targets, fitted):
        alone = Episode("u", shots[1:], target.query)  # its own episode with the shots the row shows
        assert f.tokens == tokenize_text(byte_tokenizer, render_episode(alone))
    shared = fitted[0].tokens["shots_length"]
    assert shared == fitted[1].tokens["shots_length"] > 0
    assert fitted[0].tokens["prompt_ids"][:shared] == fitted[1].tokens["prompt_ids"][:shared]
    assert fitted[0].tokens["prompt_ids"][shared:] != fitted[1].tokens["prompt_ids"][shared:]
    # a target no number of shots fits is left out; the others are fitted without it
    too_long = Episode("u", shots, Shot("?" * 500, "yes", "no"), shot_set="u/0/0")
    assert fit_shot_set([too_long, targets[0]], byte_tokenizer, max_length=10_000, max_prompt_length=400)[0] is None
