"""Synthetic users whose preferences are known exactly, so personalization is measurable on a CPU.

An answer has four observable properties, each with two poles, each visible in the text:

    tone    formal ("Certainly." ...)       | casual ("Hey!" ...)             the opening phrase
    length  brief (one step)                | detailed (four steps)           the word count
    format  prose (one paragraph)           | bullets (one "- " line a step)  the line layout
    mood    enthusiastic (upbeat closing)   | reserved (sober closing)        the closing sentence

A user cares about `dims_per_user` properties and prefers one pole of each. The two answers of a pair
answer the same question with the same steps; they differ on a non-empty subset of the user's
properties (the preferred one holding the user's poles there) and agree on everything else. Across
users each pole is equally common, so without shots the preferred answer cannot be guessed: a model
can only personalize by reading the shots.

Held-out users are disjoint from training users. By default half of them hold combinations of poles that
no training user holds: for some property pairs only the "diagonal" combinations are trained, which keeps
every single pole balanced in training while the "anti-diagonal" ones are held out. That measures reading
beyond the training population. With `held_out_combinations=False` training and held-out users alike
cycle through every combination: one population, the one the ideal reader (`bayes_optimal_choice`)
assumes, so that reader is the ceiling a model of the training users can reach.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import re
from dataclasses import dataclass
from fractions import Fraction

from fspo_ray.data.readers import PreferencePair

DIMENSIONS: dict[str, tuple[str, str]] = {
    "tone": ("formal", "casual"),
    "length": ("brief", "detailed"),
    "format": ("prose", "bullets"),
    "mood": ("enthusiastic", "reserved"),
}
_ADJECTIVE = {"formal": "formal", "casual": "casual", "brief": "brief", "detailed": "detailed",
              "prose": "paragraph-style", "bullets": "bulleted", "enthusiastic": "enthusiastic",
              "reserved": "reserved"}  # fmt: skip

_OPENERS = {"formal": ["Certainly.", "Indeed.", "Of course."], "casual": ["Hey!", "Oh, easy!", "Yo!"]}
_CLOSERS = {
    "enthusiastic": ["You are going to love it!", "This will be great fun!", "Enjoy every minute!"],
    "reserved": ["That is all.", "Proceed with care.", "Results may vary."],
}
_ALL_OPENERS = sorted((o for openers in _OPENERS.values() for o in openers), key=len, reverse=True)
_ALL_CLOSERS = sorted((c for closers in _CLOSERS.values() for c in closers), key=len, reverse=True)
OFF_TASK = -2.0  # the score of an answer that does not answer the question: below any on-task answer
_DETAILED_MIN_WORDS = 17  # brief answers run 6-12 words, detailed ones 22 or more

_TASKS = [
    ("bake bread", ["mix flour and water", "knead the dough well", "let it rise", "bake it in a hot oven"]),
    ("grow tomatoes", ["pick a sunny spot", "water the soil daily", "stake the young plants", "pick them when red"]),
    ("learn to swim", ["start in shallow water", "practice floating", "kick with straight legs", "breathe sideways"]),
    ("fix a flat tire", ["remove the wheel", "find the hole", "patch the tube", "pump it back up"]),
    ("brew coffee", ["grind fresh beans", "heat the water", "pour it slowly", "let it steep briefly"]),
    ("start running", ["buy good shoes", "run slowly at first", "rest between runs", "add distance each week"]),
    ("save money", ["track every expense", "set a monthly budget", "cook at home", "move savings first"]),
    ("paint a room", ["clear the furniture", "tape the edges", "roll on a primer", "apply two thin coats"]),
    ("train a puppy", ["use small treats", "keep sessions short", "repeat each command", "praise good behavior"]),
    ("write an essay", ["pick a clear topic", "outline the main points", "write a rough draft", "revise it twice"]),
    ("plan a trip", ["choose the dates", "set a budget", "book a place to stay", "pack light"]),
    ("learn guitar", ["tune the strings", "learn three chords", "practice every day", "play simple songs"]),
    ("clean a laptop", ["turn it off", "wipe the screen gently", "blow dust from the keys", "clean the case"]),
    ("make pasta", ["boil salted water", "add the pasta", "stir it often", "drain it when tender"]),
    ("sleep better", ["keep a fixed bedtime", "avoid late coffee", "dim the lights", "keep the room cool"]),
    ("study for exams", ["plan your sessions", "review old notes", "test yourself often", "sleep well before"]),
    ("build a birdhouse", ["cut the boards", "drill an entry hole", "nail the walls", "mount it on a post"]),
    ("care for a cactus", ["use sandy soil", "water it rarely", "give it bright light", "avoid cold drafts"]),
    ("start a podcast", ["pick a topic", "get a decent microphone", "record a pilot", "publish on a schedule"]),
    ("make a budget", ["list your income", "list fixed costs", "set spending limits", "review it monthly"]),
    ("learn to juggle", ["start with one ball", "toss it at eye level", "add a second ball", "stay relaxed"]),
    ("wash a car", ["rinse off the dirt", "use a soft sponge", "wash top to bottom", "dry it with a towel"]),
    ("meditate", ["sit comfortably", "close your eyes", "follow your breath", "start with five minutes"]),
    ("pack a suitcase", ["make a list", "roll your clothes", "put shoes at the bottom", "keep liquids sealed"]),
]
_QUESTIONS = ["How do I {task}?", "What is the best way to {task}?", "Can you explain how to {task}?"]


def render_answer(task: str, steps: list[str], poles: dict[str, str], opener: int = 0, closer: int = 0) -> str:
    """The answer text holding the given pole of every property."""
    if poles["length"] == "brief":
        sentences = [f"{steps[0][0].upper()}{steps[0][1:]}."]
    else:
        sentences = [f"To {task}, {steps[0]}.", f"Next, {steps[1]}.", f"Then {steps[2]}.", f"Finally, {steps[3]}."]
    opening, closing = _OPENERS[poles["tone"]][opener], _CLOSERS[poles["mood"]][closer]
    if poles["format"] == "bullets":
        return "\n".join([opening, *(f"- {s}" for s in sentences), closing])
    return " ".join([opening, *sentences, closing])


def detect_properties(text: str) -> dict[str, str | None]:
    """The pole of each property that an answer text shows, or None where it shows neither."""
    text = text.strip()
    tone = next((t for t, openers in _OPENERS.items() if any(text.startswith(o) for o in openers)), None)
    bullets = sum(line.lstrip().startswith("- ") for line in text.splitlines())
    last_line = text.splitlines()[-1].strip() if text else ""
    mood = next((m for m, closers in _CLOSERS.items() if any(c in last_line for c in closers)), None)
    return {
        "tone": tone,
        "length": None if not text else ("detailed" if len(text.split()) >= _DETAILED_MIN_WORDS else "brief"),
        "format": None if not text else ("bullets" if bullets >= 1 else "prose"),
        "mood": mood,
    }


def task_of(question: str) -> tuple[str, list[str]] | None:
    """The synthetic task a question asks about, with its steps; None for any other question."""
    for task, steps in _TASKS:
        if any(question == template.format(task=task) for template in _QUESTIONS):
            return task, steps
    return None


def answer_steps(text: str, task: str) -> list[str]:
    """The steps an answer gives, in order, with its opener, closer, bullets and connectives removed."""
    body = text.strip()
    body = next((body[len(o) :] for o in _ALL_OPENERS if body.startswith(o)), body)
    body = next((body[: -len(c)] for c in _ALL_CLOSERS if body.endswith(c)), body)
    sentences = [s.strip().removeprefix("- ").strip() for s in re.split(r"\.(?:\s|$)", body)]
    connectives = (f"to {task}, ", "next, ", "then ", "finally, ")
    steps = []
    for sentence in filter(None, sentences):
        sentence = sentence.lower()
        steps.append(next((sentence[len(c) :] for c in connectives if sentence.startswith(c)), sentence))
    return steps


def on_task(text: str, question: str) -> bool:
    """Whether an answer gives the asked task's steps: its first (brief) or all four in order (detailed)."""
    asked = task_of(question)
    if asked is None:
        return False
    task, steps = asked
    return answer_steps(text, task) in (steps[:1], steps)


def score_answer(text: str, preferences: dict[str, str], question: str | None = None) -> float:
    """How well an answer fits a user, in [-1, 1]: per cared property +1 if it shows the user's pole,
    -1 if it shows the other, 0 if neither; averaged. Given the question, an answer that is not on the
    asked task scores OFF_TASK, below every on-task answer. The oracle judge compares these scores."""
    if question is not None and not on_task(text, question):
        return OFF_TASK
    shown = detect_properties(text)
    return sum(0 if shown[d] is None else (1 if shown[d] == pole else -1) for d, pole in preferences.items()) / len(
        preferences
    )


def _chance_of_differing(dims: set[str], cared: tuple[str, ...]) -> Fraction:
    """P(a pair differs on exactly `dims` | the user cares about `cared`), as `user_pairs` draws it."""
    if not dims or not dims <= set(cared):
        return Fraction(0)
    each = Fraction(1, 2 ** len(cared))  # each cared property differs with probability 1/2 ...
    return each + (each / len(cared) if len(dims) == 1 else 0)  # ... and one is drawn if none did


Poles = tuple[tuple[str, str], ...]  # (property, pole) items: a dict's, hashable


@functools.cache  # an ideal reader of 1,024 episodes asks ~500k times for a few hundred distinct answers
def _likelihood(shown_poles: Poles, other_poles: Poles | None, preference_poles: Poles, noise: Fraction) -> Fraction:
    """P(a pair's preferred answer shows `shown_poles`, its dispreferred `other_poles`, | the user's
    `preference_poles`), up to the same factor for every user; other_poles=None: only the preferred answer is
    seen."""
    shown, preferences = dict(shown_poles), dict(preference_poles)
    other = dict(other_poles) if other_poles is not None else None
    cared = tuple(preferences)
    if other is not None:
        candidates = [{d for d in DIMENSIONS if shown[d] != other[d]}]
    else:
        candidates = [set(c) for r in range(1, len(cared) + 1) for c in itertools.combinations(cared, r)]
    total = Fraction(0)
    for differing in candidates:
        chance = _chance_of_differing(differing, cared)
        if not chance:
            continue
        holds = all(shown[d] == preferences[d] for d in differing)
        flipped = all(shown[d] != preferences[d] for d in differing)  # a label-noise swap
        # The properties outside `differing` show the pair's shared poles, each drawn with probability 1/2.
        shared = Fraction(1, 2 ** (len(DIMENSIONS) - len(differing)))
        total += chance * shared * ((1 - noise) * holds + noise * flipped)
    return total


def bayes_optimal_choice(
    shots: list[tuple[str, str]], query: tuple[str, str], dims_per_user: int, *, label_noise: float = 0.0,
    preferred_only: bool = False, profiles: list[dict[str, str]] | None = None,
) -> float:
    """What an ideal reader of `shots` (preferred, dispreferred) gets right on `query` (preferred,
    dispreferred) knowing how synthetic users are made, but not which user this is: 1 if it ranks the
    query's preferred answer first, 0 if second, 0.5 on a tie. It weighs every possible user by how
    likely they make the shots (seeing only the preferred answers when `preferred_only`), each alike a
    priori; `profiles` sets another prior, e.g. the training users' preferences (one entry per user)."""
    noise = Fraction(str(label_noise))
    poles = []
    for text in [t for pair in [*shots, query] for t in pair]:
        shown = detect_properties(text)
        if None in shown.values():
            raise ValueError(f"not a synthetic answer (it shows no pole of some property): {text!r}")
        poles.append(tuple(shown.items()))
    *shot_poles, won, lost = poles
    for_won = for_lost = Fraction(0)
    for profile in all_profiles(dims_per_user) if profiles is None else profiles:
        profile = tuple(profile.items())
        weight = Fraction(1)
        for shown, other in zip(shot_poles[::2], shot_poles[1::2]):
            weight *= _likelihood(shown, None if preferred_only else other, profile, noise)
        for_won += weight * _likelihood(won, lost, profile, noise)
        for_lost += weight * _likelihood(lost, won, profile, noise)
    return 1.0 if for_won > for_lost else 0.0 if for_won < for_lost else 0.5


def all_profiles(dims_per_user: int) -> list[dict[str, str]]:
    """Every user `dims_per_user` allows, equally likely a priori."""
    trained, held_out_only = _profiles(dims_per_user)
    return trained + held_out_only


def describe(preferences: dict[str, str]) -> str:
    adjectives = [_ADJECTIVE[preferences[d]] for d in DIMENSIONS if d in preferences]
    return f"This user prefers {' and '.join(adjectives)} answers."


@dataclass(frozen=True)
class SyntheticUser:
    user_id: str
    preferences: dict[str, str]
    split: str  # "train" or "test"
    novel_combination: bool  # no training user prefers this combination

    @property
    def description(self) -> str:
        return describe(self.preferences)


def _profiles(dims_per_user: int) -> tuple[list[dict], list[dict]]:
    """(trained profiles, held-out-only profiles); each pole equally common among the trained ones."""
    trained, novel = [], []
    for k, dims in enumerate(itertools.combinations(DIMENSIONS, dims_per_user)):
        for poles in itertools.product((0, 1), repeat=dims_per_user):
            profile = {d: DIMENSIONS[d][p] for d, p in zip(dims, poles)}
            # For every other property combination, hold out the combinations with mixed poles.
            mixed = dims_per_user > 1 and len(set(poles)) > 1
            (novel if k % 2 == 1 and mixed else trained).append(profile)
    return trained, novel


def make_users(n_train: int, n_test: int, dims_per_user: int = 2, held_out_combinations: bool = True,
               train_dims_per_user: list[int] | None = None) -> list[SyntheticUser]:
    """`n_train` training users, then `n_test` held-out ones; with `held_out_combinations`, half the held-out
    users hold a combination of poles no training user holds, else every user cycles through them all.
    `train_dims_per_user` gives the training users' numbers of properties, cycled over them (default: all
    `dims_per_user`); each number's users cycle through that number's combinations."""
    train_dims = list(train_dims_per_user or [dims_per_user])
    pools = {}  # {number of properties: (the combinations training users hold, those only held-out users hold)}
    for dims in {dims_per_user, *train_dims}:
        if not 1 <= dims <= len(DIMENSIONS):
            raise ValueError(f"dims_per_user must be in 1..{len(DIMENSIONS)}, got {dims}")
        trained, novel = _profiles(dims)
        pools[dims] = (trained, novel) if held_out_combinations else (trained + novel, [])
    users = []
    for i in range(n_train):
        trained = pools[train_dims[i % len(train_dims)]][0]
        users.append(SyntheticUser(f"train-{i:05d}", trained[(i // len(train_dims)) % len(trained)], "train", False))
    trained, novel = pools[dims_per_user]
    seen = {tuple(sorted(u.preferences.items())) for u in users}
    for i in range(n_test):
        if not held_out_combinations:
            profile = trained[i % len(trained)]
        else:  # every other held-out user holds a combination no training user holds (one property: none)
            pool = novel if (i % 2 == 0 and novel) else trained
            profile = pool[(i // 2) % len(pool)]
        users.append(SyntheticUser(f"test-{i:05d}", profile, "test", tuple(sorted(profile.items())) not in seen))
    return users


def user_pairs(user: SyntheticUser, n_pairs: int, seed: int, label_noise: float = 0.0) -> list[PreferencePair]:
    rng = random.Random(f"pairs/{seed}/{user.user_id}")
    pairs = []
    cared = list(user.preferences)
    for k in range(n_pairs):
        task, steps = rng.choice(_TASKS)
        question = rng.choice(_QUESTIONS).format(task=task)
        differing = [d for d in cared if rng.random() < 0.5] or [rng.choice(cared)]
        shared = {d: rng.choice(poles) for d, poles in DIMENSIONS.items()}
        won = {**shared, **{d: user.preferences[d] for d in differing}}
        lost = {**shared, **{d: _other(d, user.preferences[d]) for d in differing}}
        opener, closer = rng.randrange(3), rng.randrange(3)
        preferred, dispreferred = (render_answer(task, steps, p, opener, closer) for p in (won, lost))
        if rng.random() < label_noise:
            (preferred, won), (dispreferred, lost) = (dispreferred, lost), (preferred, won)
        pairs.append(
            PreferencePair(
                user_id=user.user_id,
                question=question,
                preferred=preferred,
                dispreferred=dispreferred,
                user_description=user.description,
                # The persona the losing answer was written for: its poles on the user's properties.
                dispreferred_description=describe({d: lost[d] for d in cared}),
                source=f"synthetic {user.user_id} pair {k}",
                order=k,
            )
        )
    return pairs


def _other(dim: str, pole: str) -> str:
    a, b = DIMENSIONS[dim]
    return b if pole == a else a


def write_synthetic(
    out_dir: str,
    *,
    n_train_users: int = 256,
    n_test_users: int = 64,
    pairs_per_user: int = 40,
    dims_per_user: int = 2,
    train_dims_per_user: list[int] | None = None,
    label_noise: float = 0.0,
    train_label_noise: float | None = None,
    held_out_combinations: bool = True,
    seed: int = 0,
) -> dict[str, str]:
    """Write `train.jsonl` and `test.jsonl` (canonical schema) and `users.json`; return their paths.

    `train_label_noise` sets the training users' flip rate apart from the held-out users' `label_noise`:
    consistent training users teach the reading in fewer steps than the noisy users it is then used on.
    `train_dims_per_user` does the same for the number of properties (e.g. [1, 2] under `dims_per_user=2`):
    a one-property user's every pair shows that property, which teaches reading it plainly."""
    os.makedirs(out_dir, exist_ok=True)
    users = make_users(n_train_users, n_test_users, dims_per_user, held_out_combinations, train_dims_per_user)
    noise = {"train": label_noise if train_label_noise is None else train_label_noise, "test": label_noise}
    paths = {split: os.path.join(out_dir, f"{split}.jsonl") for split in ("train", "test")}
    files = {split: open(path, "w", encoding="utf-8") for split, path in paths.items()}
    with files["train"], files["test"]:
        for user in users:
            for pair in user_pairs(user, pairs_per_user, seed, noise[user.split]):
                row = {k: v for k, v in pair.as_row().items() if k not in ("source", "order")}
                files[user.split].write(json.dumps(row) + "\n")
    paths["users"] = os.path.join(out_dir, "users.json")
    with open(paths["users"], "w", encoding="utf-8") as f:
        json.dump(
            {u.user_id: {"split": u.split, "preferences": u.preferences, "description": u.description,
                         "novel_combination": u.novel_combination, "label_noise": noise[u.split]} for u in users},
            f, indent=1,
        )  # fmt: skip
    return paths
