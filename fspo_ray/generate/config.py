"""`jobs.generate_data`'s settings, and the checks made on them before anything runs."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from fspo_ray.config import ConfigError

DOMAINS = ("advice", "explain")
JUDGES = ("auto", "likelihood", "generative")


@dataclass
class GenerateDataConfig:
    out: str = MISSING  # output folder (train.jsonl, test.jsonl, summary.json); a re-run with it resumes
    personas: str = "shipped"  # shipped (our 32) or a file: .jsonl with user_id, user_description; .txt one a line
    n_personas: int | None = None  # use the first N personas (null: all)
    questions: str = "shipped"  # shipped (the `domain` list) or a file: .txt one a line, .jsonl with question
    domain: str = "advice"  # questions=shipped: advice | explain (30 questions each)
    n_questions: int | None = None  # use N of the questions, drawn with the seed (null: all)
    n_contrasts: int = 1  # answers written for other personas paired with each persona's own: rows per question
    model: str = "smollm2-135m"  # writes the answers: a preset or local HF folder (its chat template is used)
    judge_model: str | None = None  # labels pairs: preset, HF folder or http(s):// OpenAI-compatible URL (null: model)
    judge: str = "auto"  # likelihood | generative | auto (likelihood for a local judge_model, generative for a URL)
    judge_margin: float = 0.03  # likelihood judge: a pair's score (nats per token) must pass ± this, else undecided
    judge_model_name: str = "judge"  # judge_model is an endpoint: the model name it serves
    judge_api_key_env: str = "OPENAI_API_KEY"  # judge_model is an endpoint: the variable holding its API key
    judge_temperature: float = 0.0  # generative judge, local: the sampling temperature over {m, M} (0: greedy)
    validate: bool = False  # also judge a known-truth set with both judges; summary.json says how often each is right
    backend: str = "auto"  # auto (vLLM where it runs, else transformers) | vllm | transformers
    max_new_tokens: int = 160  # longest answer, in tokens (answers that reach it are counted in the summary)
    temperature: float = 0.7  # answer sampling temperature (0: greedy)
    test_fraction: float = 0.2  # share of personas held out to test.jsonl (at least one when above 0)
    seed: int = 0  # seeds question sampling, contrast choice, answer sampling and the split
    concurrency: int = 1  # model replicas per stage (one GPU each where there are GPUs)
    batch_size: int = 64  # prompts a replica takes at a time (vLLM batches them continuously: more is faster)
    verbose: bool = False  # Ray's and the libraries' output on the console too (else only <out>.log)


# Keys that do not change what a row holds: a resumed run may change them.
RESUME_SAFE = {"out", "personas", "n_personas", "questions", "domain", "n_questions", "backend",
               "concurrency", "batch_size", "verbose", "judge_api_key_env", "validate"}  # fmt: skip


def is_endpoint(model: str | None) -> bool:
    return (model or "").startswith(("http://", "https://"))


def judge_of(cfg: GenerateDataConfig) -> str:
    """The judge `cfg` asks for: `auto` is the likelihood judge for a local model, the generative one for a URL."""
    if cfg.judge != "auto":
        return cfg.judge
    return "generative" if is_endpoint(cfg.judge_model) else "likelihood"


def validate(cfg: GenerateDataConfig) -> None:
    problems = []
    if cfg.domain not in DOMAINS:
        problems.append(f"domain={cfg.domain} is not one of {', '.join(DOMAINS)}")
    for key in ("n_personas", "n_questions"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            problems.append(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.n_contrasts < 1:
        problems.append(f"n_contrasts={cfg.n_contrasts} must be at least 1")
    if not 0 <= cfg.test_fraction < 1:
        problems.append(f"test_fraction={cfg.test_fraction} must be in [0, 1)")
    for key in ("temperature", "judge_temperature"):
        if not 0 <= getattr(cfg, key) <= 2:  # what both engines sample (vLLM refuses more)
            problems.append(f"{key}={getattr(cfg, key)} must be in [0, 2]")
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.concurrency < 1:
        problems.append("max_new_tokens, batch_size and concurrency must be at least 1")
    if cfg.backend not in ("auto", "vllm", "transformers"):
        problems.append(f"backend={cfg.backend} is not one of auto, vllm, transformers")
    if cfg.judge not in JUDGES:
        problems.append(f"judge={cfg.judge} is not one of {', '.join(JUDGES)}")
    elif cfg.judge == "likelihood" and is_endpoint(cfg.judge_model):
        problems.append(f"judge=likelihood scores answers with a local model's log-probs; "
                        f"judge_model={cfg.judge_model} is an endpoint (use judge=generative, or a local judge_model)")
    if cfg.judge_margin < 0:
        problems.append(f"judge_margin={cfg.judge_margin} must be at least 0")
    if problems:
        raise ConfigError("; ".join(problems))
