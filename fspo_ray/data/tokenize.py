"""Episodes -> prompt/completion text -> token ids and labels, as the reference tokenizes them.

Prompt and completions are tokenized separately without special tokens (no chat template, no BOS),
EOS is appended to each completion. The loss and the sequence log-probs cover exactly the completion
tokens, EOS included; the prompt is stored once per episode, not once per completion.

A prompt is tokenized in two pieces joined: its examples (the shots), then the task with its question
(`tokenize_prompt`, the one place training, evaluation and serving take prompt ids from). So every
target of one shot set begins with the same ids, `shots_length` of them, which packing computes once
(logprobs.py), and an episode's tokens are the same whether it is packed alone or with its shot set's
other targets.

Length policy: the reference cuts prompts and responses to fit, which can silently remove the query or
train on empty responses. Here nothing is ever cut: while the episode is too long the oldest shot is
dropped whole; if even the query alone does not fit, the episode is skipped. Both are counted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fspo_ray.data.episodes import Episode
from fspo_ray.data.prompts import DescriptionMode, build_completion, build_prompt, example_block, render_examples
from fspo_ray.data.readers import DataError


@dataclass(frozen=True)
class PromptStyle:
    preferred_only: bool = False
    description_mode: DescriptionMode = "none"

    @classmethod
    def from_run_info(cls, info: dict) -> PromptStyle:
        """The style a run was trained with, from its fspo_run.json (fspo_ray.runinfo); the default for {}."""
        return cls(bool(info.get("preferred_only", False)), info.get("description_mode", "none"))


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A model folder's tokenizer, loaded once per process (Ray Data tasks call this per batch)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class EpisodeText:
    prompt: str
    chosen: str
    rejected: str
    shots_used: int  # the newest `shots_used` shots of the episode are in the prompt
    examples: str = ""  # the prompt's beginning that shows the shots (tokenized apart from the rest)


def render_episode(episode: Episode, style: PromptStyle = PromptStyle(), shots_dropped: int = 0) -> EpisodeText:
    """The episode's prompt and completions with the `shots_dropped` oldest shots left out."""
    mode = style.description_mode
    if mode == "teacher_forced" and not episode.user_description:
        raise DataError(f"{episode.query_source}: teacher_forced descriptions need user_description")
    if mode == "generated" and not (episode.user_description and episode.dispreferred_description):
        raise DataError(
            f"{episode.query_source}: generated descriptions need user_description and dispreferred_description"
        )
    shots = episode.shots[shots_dropped:]
    prompt = build_prompt(
        shots,
        episode.query.question,
        preferred_only=style.preferred_only,
        description_mode=mode,
        user_description=episode.user_description,
    )

    def completion(response: str, description: str | None) -> str:
        return build_completion(
            response, preferred_only=style.preferred_only, description_mode=mode, description=description
        )

    return EpisodeText(
        prompt=prompt,
        chosen=completion(episode.query.preferred, episode.user_description),
        rejected=completion(episode.query.dispreferred, episode.dispreferred_description),
        shots_used=len(shots),
        examples=render_examples(shots, style.preferred_only),
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _split_ids(tokenizer, prompt: str, examples: str) -> tuple[list[int], int]:
    if not prompt.startswith(examples):
        raise ValueError("the prompt does not begin with its examples")
    shots_ids = _ids(tokenizer, examples) if examples else []
    return shots_ids + _ids(tokenizer, prompt[len(examples) :]), len(shots_ids)


def tokenize_prompt(
    tokenizer, shots: tuple, question: str, *, style: PromptStyle = PromptStyle(), user_description: str | None = None
) -> tuple[list[int], int]:
    """(the prompt's token ids, how many of them are its examples): the examples and the task with its
    question tokenized apart and joined."""
    prompt = build_prompt(shots, question, preferred_only=style.preferred_only, description_mode=style.description_mode,
                          user_description=user_description)  # fmt: skip
    return _split_ids(tokenizer, prompt, render_examples(shots, style.preferred_only))


def tokenize_text(tokenizer, text: EpisodeText) -> dict[str, Any]:
    """The prompt's ids and each completion's ids with its EOS; a sequence is prompt + completion, so the
    prompt is stored once and the loss's positions are those after it. `shots_length`: how many of the
    prompt's ids are its examples (the ids the targets of one shot set share)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    prompt_ids, shots_length = _split_ids(tokenizer, text.prompt, text.examples)
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": _ids(tokenizer, text.chosen) + [tokenizer.eos_token_id],
        "rejected_ids": _ids(tokenizer, text.rejected) + [tokenizer.eos_token_id],
        "shots_length": shots_length,
    }


@dataclass(frozen=True)
class FittedEpisode:
    text: EpisodeText
    tokens: dict[str, Any]
    shots_dropped: int


def fit_episode(
    episode: Episode,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    style: PromptStyle = PromptStyle(),
) -> FittedEpisode | None:
    """Tokenize the episode, dropping the oldest shots until it fits; None if even 0 shots do not fit.

    Fits means: prompt <= max_prompt_length and prompt + the longer completion (EOS included) <= max_length.
    """
    full = render_episode(episode, style)  # also checks the descriptions the style needs
    # EOS included; completions do not depend on the shots, so they are measured once.
    completion_length = max(len(_ids(tokenizer, c)) for c in (full.chosen, full.rejected)) + 1
    fitted = fit_prompt(
        episode.shots,
        episode.query.question,
        tokenizer,
        _prompt_budget(completion_length, max_length, max_prompt_length),
        style=style,
        user_description=episode.user_description,
    )
    if fitted is None:
        return None
    text = render_episode(episode, style, fitted[1])
    return FittedEpisode(text, tokenize_text(tokenizer, text), fitted[1])


def fit_shot_set(
    episodes: Sequence[Episode],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    style: PromptStyle = PromptStyle(),
) -> list[FittedEpisode | None]:
    """The targets of one shot set (episodes with the same shots) fitted to the same shots: every one drops
    the oldest shots that the longest of them must drop, so all begin with the same ids and pack into one
    row; each is then exactly the ordinary episode with those shots. None for a target that no number of
    shots makes fit (`fit_episode`'s None); a target that the shared drop would not fit (tokens need not
    shrink with the text) keeps its own fit, and its own row."""
    tokenizer = _RememberedIds(tokenizer)
    own = [
        fit_episode(e, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, style=style)
        for e in episodes
    ]
    dropped = max((f.shots_dropped for f in own if f), default=0)
    fitted = []
    for episode, alone in zip(episodes, own):
        if alone is None or alone.shots_dropped == dropped:
            fitted.append(alone)
            continue
        text = render_episode(episode, style, dropped)
        tokens = tokenize_text(tokenizer, text)
        longer = max(len(tokens["chosen_ids"]), len(tokens["rejected_ids"]))
        fits = len(tokens["prompt_ids"]) <= _prompt_budget(longer, max_length, max_prompt_length)
        fitted.append(FittedEpisode(text, tokens, dropped) if fits else alone)
    return fitted


class _RememberedIds:
    """A tokenizer that tokenizes each text once: a shot set's targets share their shots, whose text (the
    longest of an episode) fitting and then rendering each target would tokenize twice per target."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token_id, self.ids = tokenizer, tokenizer.eos_token_id, {}

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        if text not in self.ids:
            self.ids[text] = _ids(self.tokenizer, text)
        return {"input_ids": self.ids[text]}


def _prompt_budget(completion_length: int, max_length: int, max_prompt_length: int) -> int:
    """The most prompt tokens an episode may have: what fitting means, for one episode or a shot set."""
    return min(max_prompt_length, max_length - completion_length)


def fit_prompt(
    shots: tuple,
    question: str,
    tokenizer,
    max_prompt_tokens: int,
    *,
    style: PromptStyle = PromptStyle(),
    user_description: str | None = None,
) -> tuple[list[int], int] | None:
    """(prompt token ids, shots dropped) with the fewest oldest shots dropped that make it fit; None if
    even the question alone does not. Serving uses this where training uses `fit_episode`: the same policy.

    Linear in the history: each shot is tokenized once, newest first, only until the budget is spent, and
    the guess this gives is checked on the whole prompt (tokens can merge across a shot's edges).
    """

    def prompt_ids(dropped: int) -> list[int]:
        return tokenize_prompt(tokenizer, shots[dropped:], question, style=style, user_description=user_description)[0]

    left = max_prompt_tokens - len(prompt_ids(len(shots)))
    dropped = len(shots)
    while dropped > 0:
        block = example_block(dropped, shots[dropped - 1], style.preferred_only)
        left -= len(_ids(tokenizer, block))
        if left < 0:
            break
        dropped -= 1
    ids = prompt_ids(dropped)
    while len(ids) > max_prompt_tokens and dropped < len(shots):
        dropped += 1
        ids = prompt_ids(dropped)
    while dropped > 0 and len(longer := prompt_ids(dropped - 1)) <= max_prompt_tokens:
        dropped, ids = dropped - 1, longer
    return (ids, dropped) if len(ids) <= max_prompt_tokens else None


def episode_record(episode: Episode, fitted: FittedEpisode | EpisodeText) -> dict[str, Any]:
    """What `jobs.build_episodes` writes: the text and the shots actually placed in the prompt."""
    text = fitted.text if isinstance(fitted, FittedEpisode) else fitted
    dropped = len(episode.shots) - text.shots_used
    row = episode.as_row()
    return {
        "user_id": episode.user_id,
        "prompt": text.prompt,
        "chosen": text.chosen,
        "rejected": text.rejected,
        "shots": row["shots"][dropped:],
        "query": row["query"],
        "user_description": episode.user_description,
        "shots_dropped": dropped,
        "query_source": episode.query_source,
    }
