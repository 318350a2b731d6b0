"""The exact FSPO prompt text (fspo-method.md §1.3-1.4), from each input format through to the prompt."""

import json

import pytest

from fspo_ray.data.episodes import Episode, build_episodes
from fspo_ray.data.prompts import Shot, build_completion, build_prompt, strip_completion_header
from fspo_ray.data.readers import read_pairs
from fspo_ray.data.tokenize import PromptStyle, render_episode

SHOTS = (Shot("Q1?", "good one", "bad one"), Shot("Q2?", "good two", "bad two"))

TWO_SHOT_PROMPT = (
    "# Example 1\n## Question \nQ1?\n## Preferred Response \ngood one\n## Dispreferred Response \nbad one\n\n"
    "# Example 2\n## Question \nQ2?\n## Preferred Response \ngood two\n## Dispreferred Response \nbad two\n\n"
    "# Task\nGiven the examples above, generate a preferred response to the following question.\n"
    "## Question \nWhat now?\n"
)


def test_two_shot_prompt_and_completions():
    assert build_prompt(SHOTS, "What now?") == TWO_SHOT_PROMPT
    assert build_completion("an answer") == "## Preferred Response \nan answer\n"


def test_zero_shot_prompt():
    assert build_prompt([], "What now?") == (
        "# Task\nGenerate a response to the following question.\n## Question \nWhat now?\n"
    )


def test_preferred_only_variant():
    assert build_prompt(SHOTS, "What now?", preferred_only=True) == (
        "# Example 1\n## Question \nQ1?\n## Response \ngood one\n\n"
        "# Example 2\n## Question \nQ2?\n## Response \ngood two\n\n"
        "# Task\nGiven the examples above, generate a response to the following question.\n"
        "## Question \nWhat now?\n"
    )
    assert build_completion("x", preferred_only=True) == "## Response \nx\n"


DESCRIPTION_TASK = (
    "# Task\nGenerate a user description based on the examples above. "
    "Then, generate a preferred response to the following question.\n## Question \nWhat now?\n"
)


def test_generated_description_variant():
    examples = TWO_SHOT_PROMPT[: TWO_SHOT_PROMPT.index("# Task")]
    assert build_prompt(SHOTS, "What now?", description_mode="generated") == examples + DESCRIPTION_TASK
    assert build_completion("y", description_mode="generated", description="Likes cats.") == (
        "## User Description\nLikes cats.\n## Preferred Response \ny\n"
    )


def test_teacher_forced_description_variant():
    examples = TWO_SHOT_PROMPT[: TWO_SHOT_PROMPT.index("# Task")]
    prompt = build_prompt(SHOTS, "What now?", description_mode="teacher_forced", user_description="Likes cats.")
    assert prompt == examples + DESCRIPTION_TASK + "## User Description\nLikes cats.\n"
    assert build_completion("y", description_mode="teacher_forced") == "## Preferred Response \ny\n"


def test_zero_shots_in_a_description_mode_use_the_zero_shot_task_line():
    """The reference checks for 0 shots before the description modes: there is nothing to describe from."""
    zero_shot = "# Task\nGenerate a response to the following question.\n## Question \nWhat now?\n"
    assert build_prompt([], "What now?", description_mode="generated") == zero_shot
    assert build_prompt([], "What now?", description_mode="teacher_forced", user_description="Likes cats.") == (
        zero_shot + "## User Description\nLikes cats.\n"
    )


def test_invalid_combinations_are_refused():
    with pytest.raises(ValueError, match="preferred_only"):
        build_prompt(SHOTS, "q", preferred_only=True, description_mode="generated")
    with pytest.raises(ValueError, match="description_mode"):
        build_prompt(SHOTS, "q", description_mode="cot")
    with pytest.raises(ValueError, match="user's description"):
        build_prompt(SHOTS, "q", description_mode="teacher_forced")


def test_strip_completion_header_inverts_build_completion():
    assert strip_completion_header(build_completion("an answer")) == (None, "an answer")
    text = build_completion("y", description_mode="generated", description="Likes cats.")
    assert strip_completion_header(text) == ("Likes cats.", "y")
    assert strip_completion_header("no header here") == (None, "no header here")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_roleplay_file_to_prompt(tmp_path):
    rows = [
        {"x": f" Q{i}? ", "yw": f"win {i}\n", "yl": f"lose {i}", "level": "p-1",
         "score_persona": {"persona_description": "A pirate."}}
        for i in range(2)
    ]  # fmt: skip
    pairs = list(read_pairs("roleplay:" + _write_jsonl(tmp_path / "r.jsonl", rows)))
    [episode], _ = build_episodes(pairs, shots=1, passes=1, seed=0)
    shot, query = episode.shots[0], episode.query
    text = render_episode(episode, PromptStyle(description_mode="teacher_forced"))
    assert text.prompt == (
        f"# Example 1\n## Question \n{shot.question}\n## Preferred Response \n{shot.preferred}\n"
        f"## Dispreferred Response \n{shot.dispreferred}\n\n"
        + DESCRIPTION_TASK.replace("What now?", query.question)
        + "## User Description\nA pirate.\n"
    )
    assert {shot.question, query.question} == {"Q0?", "Q1?"}  # stripped
    assert text.chosen == f"## Preferred Response \n{query.preferred}\n"
    assert text.rejected == f"## Preferred Response \n{query.dispreferred}\n"


def test_elix_file_to_prompt_maps_labels(tmp_path):
    rows = [
        {"prompt": "Why is the sky blue?", "response_x": "Light scatters.", "response_y": "Rayleigh scattering.",
         "label": 1, "level_x": "a child", "level_y": "a physicist", "scorer_level": "a physicist"},
        {"prompt": "What is rain?", "response_x": "Water falls.", "response_y": "Condensation.",
         "label": 0, "level_x": "a physicist", "level_y": "a child", "scorer_level": "a physicist"},
    ]  # fmt: skip
    pairs = list(read_pairs("elix:" + _write_jsonl(tmp_path / "e.jsonl", rows)))
    episodes, _ = build_episodes(pairs, shots=1, passes=1, seed=0)
    episode = episodes[0]
    text = render_episode(episode, PromptStyle(description_mode="generated"))
    by_question = {"Why is the sky blue?": ("Rayleigh scattering.", "Light scatters.", "The user is a child."),
                   "What is rain?": ("Water falls.", "Condensation.", "The user is a child.")}  # fmt: skip
    shot_win, shot_lose, _ = by_question[episode.shots[0].question]
    q_win, q_lose, losing_description = by_question[episode.query.question]
    assert text.prompt == (
        f"# Example 1\n## Question \n{episode.shots[0].question}\n## Preferred Response \n{shot_win}\n"
        f"## Dispreferred Response \n{shot_lose}\n\n" + DESCRIPTION_TASK.replace("What now?", episode.query.question)
    )
    assert text.chosen == f"## User Description\nThe user is a physicist.\n## Preferred Response \n{q_win}\n"
    assert text.rejected == f"## User Description\n{losing_description}\n## Preferred Response \n{q_lose}\n"


def test_dpo_json_file_to_zero_shot_prompts(tmp_path):
    path = tmp_path / "sampled.json"
    path.write_text(
        json.dumps(
            {
                "\n\nHuman: hi\n\nAssistant:": {
                    "responses": ["Hello!", "Go away.", "Hey."],
                    "pairs": [[0, 1], [2, 1]],
                    "sft_target": "Hello!",
                }
            }
        )
    )
    episodes, _ = build_episodes(read_pairs(str(path)), shots=0, passes=1, seed=0)
    texts = [render_episode(e) for e in episodes]
    expected_prompt = "# Task\nGenerate a response to the following question.\n## Question \nHuman: hi\n\nAssistant:\n"
    assert [t.prompt for t in texts] == [expected_prompt, expected_prompt]
    assert [(t.chosen, t.rejected) for t in texts] == [
        ("## Preferred Response \nHello!\n", "## Preferred Response \nGo away.\n"),
        ("## Preferred Response \nHey.\n", "## Preferred Response \nGo away.\n"),
    ]


def test_missing_descriptions_are_named():
    episode = Episode("u", SHOTS, Shot("q", "a", "b"), query_source="f.jsonl row 9")
    with pytest.raises(ValueError, match="f.jsonl row 9: generated descriptions need"):
        render_episode(episode, PromptStyle(description_mode="generated"))


def test_answer_start_while_streaming():
    from fspo_ray.data.prompts import answer_start

    assert answer_start("## Pref") is None  # could still be the header
    assert answer_start("## Preferred Response \nHel") == len("## Preferred Response \n")
    assert answer_start("Hello") == 0  # no header at all: all of it is the answer
    assert answer_start("## User Description\nLikes cats.\n## Pre") is None
    text = "## User Description\nLikes cats.\n## Preferred Response \nMeow"
    assert text[answer_start(text) :] == "Meow"
    assert answer_start("## Response \nx", preferred_only=True) == len("## Response \n")
