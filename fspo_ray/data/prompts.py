"""The FSPO prompt text. This module is the only place it lives.

Training, evaluation and serving all build prompts here, so a served model sees exactly the text it
was trained on. The layout is the reference implementation's (fspo-method.md §1.3-1.4), byte for byte:
note the space before the newline after "## Question", "## Preferred Response" and friends, and its
absence after "# Example k", "# Task" and "## User Description".

Data generation's prompt for an answer written for one persona lives here too (`persona_answer_prompt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DescriptionMode = Literal["none", "generated", "teacher_forced"]
DESCRIPTION_MODES: tuple[str, ...] = ("none", "generated", "teacher_forced")

TASK_WITH_SHOTS = "Given the examples above, generate a preferred response to the following question."
TASK_WITHOUT_SHOTS = "Generate a response to the following question."
TASK_PREFERRED_ONLY = "Given the examples above, generate a response to the following question."
TASK_WITH_DESCRIPTION = (
    "Generate a user description based on the examples above. "
    "Then, generate a preferred response to the following question."
)

# jobs.generate_data: an instruction-tuned model writes, in its chat template, the answer one persona would like.
PERSONA_ANSWER_PROMPT = (
    "{description}\nWrite the answer to the question below that this user would like best.\n\nQuestion: {question}"
)

PREFERRED_HEADER = "## Preferred Response \n"
RESPONSE_HEADER = "## Response \n"
DESCRIPTION_HEADER = "## User Description\n"


@dataclass(frozen=True)
class Shot:
    """One labelled preference of a user: shown in the prompt, or held out as the query pair."""

    question: str
    preferred: str
    dispreferred: str


def persona_answer_prompt(description: str, question: str) -> str:
    return PERSONA_ANSWER_PROMPT.format(description=description, question=question)


def example_block(index: int, shot: Shot, preferred_only: bool) -> str:
    if preferred_only:
        body = f"{RESPONSE_HEADER}{shot.preferred}\n"
    else:
        body = f"{PREFERRED_HEADER}{shot.preferred}\n## Dispreferred Response \n{shot.dispreferred}\n"
    return f"# Example {index}\n## Question \n{shot.question}\n{body}\n"


def render_examples(shots: Sequence[Shot], preferred_only: bool) -> str:
    """The prompt's examples, oldest first: the part of it that one user's shot set shares."""
    return "".join(example_block(i + 1, s, preferred_only) for i, s in enumerate(shots))


def _task_line(n_shots: int, preferred_only: bool, description_mode: DescriptionMode) -> str:
    if n_shots == 0:  # before the description modes, as the reference checks it: no examples to describe
        return TASK_WITHOUT_SHOTS
    if description_mode != "none":
        return TASK_WITH_DESCRIPTION
    return TASK_PREFERRED_ONLY if preferred_only else TASK_WITH_SHOTS


def _check_mode(preferred_only: bool, description_mode: str) -> None:
    if description_mode not in DESCRIPTION_MODES:
        raise ValueError(f"description_mode must be one of {DESCRIPTION_MODES}, got {description_mode!r}")
    if preferred_only and description_mode != "none":
        # The reference code has a task line for this combination, but the method (fspo-method.md)
        # does not give its text and no paper result uses it: refused rather than guessed.
        raise ValueError("preferred_only prompts have no user-description variant (fspo-method.md §1.4)")


def build_prompt(
    shots: Sequence[Shot],
    question: str,
    *,
    preferred_only: bool = False,
    description_mode: DescriptionMode = "none",
    user_description: str | None = None,
) -> str:
    """The prompt for `question` with `shots` in context, oldest first.

    In "teacher_forced" mode the true user description follows the question, so the completion holds
    only the answer; in "generated" mode the model writes the description itself (see `build_completion`).
    """
    _check_mode(preferred_only, description_mode)
    examples = render_examples(shots, preferred_only)
    task = _task_line(len(shots), preferred_only, description_mode)
    prompt = f"{examples}# Task\n{task}\n## Question \n{question}\n"
    if description_mode == "teacher_forced":
        if not user_description:
            raise ValueError("teacher_forced prompts need the user's description")
        prompt += f"{DESCRIPTION_HEADER}{user_description}\n"
    return prompt


def build_completion(
    response: str,
    *,
    preferred_only: bool = False,
    description_mode: DescriptionMode = "none",
    description: str | None = None,
) -> str:
    """The text the model is trained to write after the prompt (EOS is added by the tokenizer step).

    Chosen and rejected completions share the header; only the body differs. In "generated" mode the
    description comes first: the true user's for the chosen answer, and for the rejected answer the
    description of the persona it was written for.
    """
    _check_mode(preferred_only, description_mode)
    header = RESPONSE_HEADER if preferred_only else PREFERRED_HEADER
    completion = f"{header}{response}\n"
    if description_mode == "generated":
        if not description:
            raise ValueError("generated-description completions need a description")
        completion = f"{DESCRIPTION_HEADER}{description}\n{completion}"
    return completion


def strip_completion_header(text: str, *, preferred_only: bool = False) -> tuple[str | None, str]:
    """Split generated text into (user description or None, answer), dropping the headers.

    Serving and evaluation call this on what the model wrote.
    """
    description = None
    if text.startswith(DESCRIPTION_HEADER):
        rest = text[len(DESCRIPTION_HEADER) :]
        header = RESPONSE_HEADER if preferred_only else PREFERRED_HEADER
        cut = rest.find(header)
        if cut == -1:
            return rest.strip(), ""
        description, text = rest[:cut].strip(), rest[cut:]
    for header in (PREFERRED_HEADER, RESPONSE_HEADER):
        if text.startswith(header):
            text = text[len(header) :]
            break
    return description, text.strip()


def answer_start(text: str, *, preferred_only: bool = False) -> int | None:
    """Where the answer begins in a completion still being generated, or None while it cannot be known
    (inside a user description or a header). Streaming uses this to send the answer alone."""
    header = RESPONSE_HEADER if preferred_only else PREFERRED_HEADER
    if text.startswith(DESCRIPTION_HEADER) or DESCRIPTION_HEADER.startswith(text):
        cut = text.find(header)
        return None if cut == -1 else cut + len(header)
    if text.startswith(header):
        return len(header)
    return None if header.startswith(text) else 0
