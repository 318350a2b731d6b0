"""The two judges that label a generated pair, as Ray Data batch inference.

A comparison is one persona's own answer to a question beside the answer written for another persona
(the contrast). A judge says which of the two the persona prefers, or why it cannot: the outcome is
`own`, `contrast`, `undecided` (likelihood: the score did not pass the margin), `inconsistent`
(generative: the two orders named different answers) or `malformed_verdict` (an unreadable reply).

**likelihood** (local models; the default). Each answer is scored on its own by the judge model, after
the persona's answer prompt (`persona_answer_prompt`, the writer's own prompt) and after the contrast
persona's:

    s(a) = [log π(a | persona, question) − log π(a | contrast persona, question)] / tokens(a)

how much more the judge expects `a` from someone writing for this persona than for the other one, per
token. The pair's score is s(own) − s(contrast) in nats per token; beyond ±`judge_margin` it names a
winner, else the pair is undecided. Neither answer sees the other (fspo_ray/logprobs.py packs them
behind one prompt without letting them attend to each other), so there is no position to be biased
toward. Why the contrast persona rather than the question alone, and why per token: measured, in
docs/data-generation.md.

**generative** (endpoints and capable models): the order-swapped m/M judge of fspo_ray/judge.py, asked
in both orders; only an order-consistent verdict names a winner.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fspo_ray.batch_inference import batch_generate, prompt_ids
from fspo_ray.console import streamed_rows
from fspo_ray.data.prompts import persona_answer_prompt
from fspo_ray.data.tokenize import load_tokenizer
from fspo_ray.engines import Sampling
from fspo_ray.generate.config import GenerateDataConfig, is_endpoint
from fspo_ray.judge import endpoint_judge, judge_prompt, order_consistent, parse_verdict
from fspo_ray.logprobs import CompletionScorer

# Each comparison row holds these: `key` (a string naming it), the `question`, the persona's `description`,
# the `contrast_description` of the persona the contrast was written for, and the two answers' texts.
COMPARISON_COLUMNS = ("key", "question", "description", "contrast_description", "own", "contrast")
# The log-probs the likelihood judge records: each answer after each persona's prompt.
LOGPS = ("own_given_persona", "own_given_contrast", "contrast_given_persona", "contrast_given_contrast")


def likelihood_outcome(logps: dict[str, float], tokens: dict[str, int], margin: float) -> tuple[str, float]:
    """(outcome, score): the score s(own) − s(contrast) in nats per token, and what it says at `margin`."""
    own = (logps["own_given_persona"] - logps["own_given_contrast"]) / tokens["own"]
    contrast = (logps["contrast_given_persona"] - logps["contrast_given_contrast"]) / tokens["contrast"]
    score = own - contrast
    return ("own" if score > margin else "contrast" if score < -margin else "undecided"), score


@dataclass(frozen=True)
class ScoringRows:
    """A Ray Data batch UDF: each comparison → two rows for `CompletionScorer`, the persona's answer prompt
    and the contrast persona's (in the judge's chat template), each followed by the own answer (as
    `chosen`) and the contrast (as `rejected`), each ending in EOS as a written answer does."""

    tokenizer_path: str

    def __call__(self, batch: dict) -> dict:
        tokenizer = load_tokenizer(self.tokenizer_path)
        out: dict[str, list] = {k: [] for k in ("key", "condition", "prompt_ids", "chosen_ids", "rejected_ids")}
        for key, question, description, contrast_description, own, contrast in zip(
            *(batch[c] for c in COMPARISON_COLUMNS)
        ):
            own_ids, contrast_ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                                     for text in (own, contrast))  # fmt: skip
            for condition, persona in (("persona", description), ("contrast", contrast_description)):
                out["key"].append(key)
                out["condition"].append(condition)
                out["prompt_ids"].append(prompt_ids(tokenizer, persona_answer_prompt(persona, question), chat=True))
                out["chosen_ids"].append(own_ids)
                out["rejected_ids"].append(contrast_ids)
        return out


def likelihood_verdicts(comparisons: list[dict], judge_path: str, cfg: GenerateDataConfig,
                        label: str) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """(key, verdict) for each comparison as `cfg.concurrency` scoring replicas finish them; the verdict
    holds the outcome, the score and the four log-probs it comes from."""
    import ray.data

    from fspo_ray.scheduling import replica_cpus, resolve_use_gpu

    use_gpu = resolve_use_gpu()
    # Tokenized and materialized first: the scorers may take every CPU, and then no task could run.
    rows = ray.data.from_items(comparisons).map_batches(ScoringRows(judge_path), batch_size=cfg.batch_size)
    scored = rows.materialize().map_batches(
        CompletionScorer,
        fn_constructor_kwargs={"models": {"judge": judge_path}},
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        num_cpus=replica_cpus(cfg.concurrency, use_gpu),
        num_gpus=1 if use_gpu else 0,
        scheduling_strategy="SPREAD",  # replicas on every node that has room, not packed onto the first
    )
    halves: dict[str, dict] = {}
    for row in streamed_rows(scored, 2 * len(comparisons), label, unit="scoring"):
        seen = halves.setdefault(row["key"], {})
        seen[row["condition"]] = row
        if len(seen) < 2:
            continue
        del halves[row["key"]]
        persona, contrast = seen["persona"], seen["contrast"]
        logps = dict(zip(LOGPS, (persona["judge_chosen"], contrast["judge_chosen"], persona["judge_rejected"],
                                 contrast["judge_rejected"])))  # fmt: skip
        tokens = {"own": len(persona["chosen_ids"]), "contrast": len(persona["rejected_ids"])}
        outcome, score = likelihood_outcome(logps, tokens, cfg.judge_margin)
        yield row["key"], {"outcome": outcome, "score": score, "logps": logps, "tokens": tokens}


def _endpoint_replies(prompts: list[dict], cfg: GenerateDataConfig, label: str):
    """The judge_model endpoint's verdicts, in Ray tasks (`concurrency` of them) calling it."""
    import ray.data

    judge = endpoint_judge(cfg.judge_model, cfg.judge_model_name, os.environ.get(cfg.judge_api_key_env))

    def call(batch: dict) -> dict:
        texts = []
        for question, first, second, description in zip(batch["question"], batch["first"], batch["second"],
                                                         batch["description"]):  # fmt: skip
            try:
                texts.append(judge(question, first, second, description, {}))
            except Exception as error:  # an endpoint failure is this row's malformed verdict, not the job's end
                texts.append(f"error: {type(error).__name__}: {error}")
        return {**batch, "text": texts, "error": [None] * len(texts)}

    dataset = ray.data.from_items(prompts).map_batches(call, batch_size=cfg.batch_size,
                                                       compute=ray.data.TaskPoolStrategy(size=cfg.concurrency))
    return streamed_rows(dataset, len(prompts), label)


def generative_verdicts(comparisons: list[dict], judge_model: str, cfg: GenerateDataConfig,
                        label: str) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """(key, verdict) for each comparison as the judge (a local model's replicas, or the endpoint) answers
    both of its orders; the verdict holds the outcome and the two raw replies."""
    prompts = []
    for row in comparisons:
        for order, (first, second) in (("own_first", ("own", "contrast")), ("contrast_first", ("contrast", "own"))):
            prompt = judge_prompt(row["question"], row[first], row[second], row["description"])
            prompts.append({"key": row["key"], "order": order, "question": row["question"], "first": row[first],
                            "second": row[second], "description": row["description"], "prompt": prompt})  # fmt: skip
    if is_endpoint(judge_model):
        stream = _endpoint_replies(prompts, cfg, label)
    else:
        dataset = batch_generate(prompts, judge_model, cfg.backend, Sampling(3, cfg.judge_temperature, seed=cfg.seed),
                                 batch_size=cfg.batch_size, concurrency=cfg.concurrency, chat=True,
                                 choices=("m", "M"))  # fmt: skip
        stream = streamed_rows(dataset, len(prompts), label)
    said: dict[str, dict] = {}
    for row in stream:
        seen = said.setdefault(row["key"], {})
        seen[row["order"]] = f"error: {row['error']}" if row["error"] else row["text"]
        if len(seen) < 2:
            continue
        del said[row["key"]]
        first, swapped = parse_verdict(seen["own_first"]), parse_verdict(seen["contrast_first"])
        winner = order_consistent(first, swapped)
        outcome = {"a": "own", "b": "contrast"}.get(winner) or ("inconsistent" if first and swapped else
                                                                "malformed_verdict")  # fmt: skip
        yield row["key"], {"outcome": outcome, "verdict_own_first": seen["own_first"],
                           "verdict_contrast_first": seen["contrast_first"]}  # fmt: skip


def verdicts(judge: str, judge_model: str, comparisons: list[dict], cfg: GenerateDataConfig, label: str):
    """The `judge` (likelihood | generative) run on `judge_model` (a local folder, or a URL for generative)."""
    run = likelihood_verdicts if judge == "likelihood" else generative_verdicts
    return run(comparisons, judge_model, cfg, label)


def tally(judged: Iterable[dict]) -> dict:
    """What a judge made of its comparisons: kept (and how many for the own answer), undecided,
    inconsistent (and which position an inconsistent judge named in both orders: its bias), malformed."""
    judged = list(judged)
    counts = Counter(v["outcome"] for v in judged)
    named = Counter(parse_verdict(v["verdict_own_first"]) for v in judged if v["outcome"] == "inconsistent")
    return {
        "judged": len(judged),
        "kept": counts["own"] + counts["contrast"],
        "kept_own_answer_preferred": counts["own"],
        "undecided": counts["undecided"],
        "inconsistent": counts["inconsistent"],
        "inconsistent_naming_first_in_both_orders": named["m"],
        "inconsistent_naming_second_in_both_orders": named["M"],
        "malformed_verdict": counts["malformed_verdict"],
    }
