"""Real people: FSPO on one Global Dialogues round's votes, beside the baselines a skeptic asks for.

    .venv/bin/python benchmarks/real_people.py --data ../shared/data/global-dialogues-gd6uk --out runs/real-people
    make bench-real-people DATA=../shared/data/global-dialogues-gd6uk

1. A seeded split by person (80/20): the held-out people are never seen in training (ids in OUT/split.json);
   the training people's votes go to OUT/train.jsonl (canonical pairs, read by training and by the
   population baselines).
2. FSPO on SmolLM2-135M + LoRA through the project's Ray Train pipeline: few-shot SFT, then few-shot IPO from
   (and referenced to) it. The population model is the same recipe with 0 shots (Pref-FT).
3. `jobs.evaluate` on the round's folder itself (`global_dialogues:DIR`, the held-out people): accuracy at
   k = 0, 1, 2, 4, 8 shots on the same target pairs for the model and every baseline, paired 95% intervals
   against k = 0, FSPO against the 0-shot population model judged by each person's own vote, and held-out
   people whose vote the model predicts differently at 8 shots than at 0.

OUT/report.json holds the recipe, each stage's time and the evaluation; OUT/accuracy_vs_shots.png the plot.
The recipe is a few settings (`key=value` after the flags; `--help-recipe` lists them), so a faster
training step changes numbers here, not code.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jobs/ from the checkout

from fspo_ray.config import config_help, parse_overrides  # noqa: E402


@dataclass
class Recipe:
    model: str = "smollm2-135m"  # the base model: a preset or a local HF folder
    test_fraction: float = 0.2  # share of people held out
    seed: int = 0  # seeds the split, the episodes, training and the evaluation's sample
    shots: int = 8  # shots in training episodes (the evaluation reads 0, 1, 2, 4, 8)
    passes: int = 2  # shuffled passes over each training person's votes (episodes = passes × votes / (shots + 1))
    preferred_only: bool = False  # shots show only the preferred answer (else both, as each person saw them)
    description_mode: str = "none"  # none (vote logs carry no user description to teach from)
    max_length: int = 1024  # prompt + completion tokens (8 full shots of GD6UK: ~750)
    max_prompt_length: int = 960  # prompt tokens
    batch_size: int = 8  # episodes per optimizer step over the 2 workers
    accumulation: int = 2  # micro-batches per step: a worker holds batch_size / (2 × this) episodes at once
    # (4 full 8-shot episodes at once took 9-10 GB a worker, the CPU attention's masks and weights above all)
    lora_r: int = 16  # LoRA rank on every linear layer
    lora_alpha: float = 32.0  # LoRA scale
    sft_examples: int = 96  # few-shot SFT episodes (0: IPO starts from, and is referenced to, the base model)
    sft_lr: float = 2e-3  # SFT learning rate
    sft_target: str = "chosen"  # SFT on the voted-for answer (the paper) | both
    ipo_examples: int = 128  # few-shot IPO episodes
    ipo_lr: float = 1e-3  # IPO learning rate
    ipo_beta: float = 0.1  # IPO beta
    ipo_sft_weight: float = 0.0  # the preferred answer's NLL added to IPO (answers are scored, not generated)
    population_sft_examples: int = 240  # the 0-shot population model's SFT episodes (~0.4 s each: short prompts)
    population_ipo_examples: int = 240  # its IPO episodes
    eval_episodes: int = 256  # held-out target pairs at most (GD6UK: all 193, one per held-out person with 9+ votes)
    eval_shots: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])  # k on the curve


def split_people(pairs, test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training people, held-out people): the sorted ids shuffled with the seed, the first share held out."""
    people = sorted({p.user_id for p in pairs})
    random.Random(seed).shuffle(people)
    cut = round(len(people) * test_fraction)
    return sorted(people[cut:]), sorted(people[:cut])


def write_training_pairs(pairs, people: set[str], path: str) -> int:
    rows = [{"user_id": p.user_id, "question": p.question, "preferred": p.preferred, "dispreferred": p.dispreferred}
            for p in pairs if p.user_id in people]  # fmt: skip
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(rows)


def train_stage(recipe: Recipe, out: str, name: str, loss: str, shots: int, examples: int, archive: str | None):
    from fspo_ray.train.config import parse_train_config
    from fspo_ray.train.run import run_training

    common = [f"model={recipe.model}", f"datasets=[{out}/train.jsonl]", f"shots={shots}", f"passes={recipe.passes}",
              f"preferred_only={recipe.preferred_only}", f"description_mode={recipe.description_mode}",
              f"batch_size={recipe.batch_size}", f"gradient_accumulation_steps={recipe.accumulation}",
              f"max_length={recipe.max_length}",
              f"max_prompt_length={recipe.max_prompt_length}", f"storage_path={out}/runs", "zero_stage=2",
              "optimizer=AdamW", "warmup_steps=2", "lr_schedule=cosine", "length_window=0",
              f"lora.r={recipe.lora_r}", f"lora.alpha={recipe.lora_alpha}", f"seed={recipe.seed}",
              f"n_examples={examples}", f"exp_name={name}", "do_first_eval=false", "eval_every=1000000",
              *([f"model.archive={archive}"] if archive else [])]  # fmt: skip
    if loss == "sft":
        settings = ["loss=sft", f"lr={recipe.sft_lr}", f"sft_target={recipe.sft_target}"]
    else:
        settings = ["loss=ipo", f"loss.beta={recipe.ipo_beta}", f"lr={recipe.ipo_lr}",
                    f"loss.sft_weight={recipe.ipo_sft_weight}"]  # fmt: skip
    cfg = parse_train_config([*common, *settings])
    run_training(cfg)
    return cfg.run_dir


def train_recipe(recipe: Recipe, out: str, prefix: str, shots: int, sft_examples: int, ipo_examples: int, times):
    """SFT then IPO from it (IPO from the base when sft_examples is 0); the IPO run's folder."""
    archive = None
    if sft_examples:
        with times(f"{prefix}sft"):
            archive = train_stage(recipe, out, f"{prefix}sft", "sft", shots, sft_examples, None)
    with times(f"{prefix}ipo"):
        return train_stage(recipe, out, f"{prefix}ipo", "ipo", shots, ipo_examples, archive)


def wait_for_free_cpus(timeout_s: float = 120.0) -> None:
    """Until training's workers have given their CPUs back: a scoring replica asks for the CPUs free when it
    starts and runs one torch thread per CPU it got (one, if it starts while they are still held)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            print(f"note: {ray.available_resources().get('CPU', 0)} CPUs free of {ray.cluster_resources()['CPU']}; "
                  "scoring may run on fewer threads", flush=True)  # fmt: skip
            return
        time.sleep(1.0)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a Global Dialogues round's folder (*_preference.csv, ...)")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument("--help-recipe", action="store_true", help="list the recipe's settings and exit")
    args, overrides = parser.parse_known_args(argv)
    if args.help_recipe:
        print("\n".join(config_help(Recipe)))
        return {}
    recipe = parse_overrides(Recipe, overrides)
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"--out {out} already holds results: choose another folder")
    os.makedirs(out)

    from fspo_ray.console import job_console
    from fspo_ray.data.readers import read_pairs, skipped_rows
    from fspo_ray.evaluate.baselines import ACCURACY_BASELINES
    from fspo_ray.evaluate.run import EvaluateConfig, evaluate
    from jobs.evaluate import summary

    stages: dict[str, float] = {}
    started = time.perf_counter()

    class times:  # noqa: N801 - reads as `with times("stage"):`
        def __init__(self, stage: str):
            self.stage = stage

        def __enter__(self):
            print(f"\n=== {self.stage}", flush=True)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            stages[self.stage] = time.perf_counter() - self.start
            print(f"=== {self.stage}: {stages[self.stage]:.0f} s", flush=True)

    spec = f"global_dialogues:{os.path.abspath(args.data)}"
    with times("split"):
        pairs = list(read_pairs(spec))
        train_people, test_people = split_people(pairs, recipe.test_fraction, recipe.seed)
        with open(os.path.join(out, "split.json"), "w") as f:
            json.dump({"seed": recipe.seed, "train": train_people, "test": test_people}, f, indent=1)
        n_train = write_training_pairs(pairs, set(train_people), os.path.join(out, "train.jsonl"))
        skipped = skipped_rows([spec])
        print(f"{len(train_people)} training people ({n_train} votes), {len(test_people)} held out "
              f"({len(pairs) - n_train} votes); rows skipped: {skipped}", flush=True)  # fmt: skip

    log = os.path.join(out, "real_people.log")
    print(f"Ray's and the libraries' output: {log}", flush=True)
    with job_console(log):
        fspo = train_recipe(recipe, out, "", recipe.shots, recipe.sft_examples, recipe.ipo_examples, times)
        population = train_recipe(recipe, out, "population_", 0, recipe.population_sft_examples,
                                  recipe.population_ipo_examples, times)  # fmt: skip
        with times("evaluation"):
            wait_for_free_cpus()
            report = evaluate(EvaluateConfig(
                model=fspo, datasets=[spec], users=test_people, out=os.path.join(out, "eval"),
                shots=recipe.eval_shots, max_shots=max(recipe.eval_shots), n_episodes=recipe.eval_episodes,
                baselines=list(ACCURACY_BASELINES), population_model=population,
                population=[os.path.join(out, "train.jsonl")], judge="votes", opponent="population_model",
                base_model=recipe.model, seed=recipe.seed,
            ))  # fmt: skip
    stages["total"] = time.perf_counter() - started
    result = {"recipe": asdict(recipe), "data": spec, "rows_skipped": skipped,
              "people": {"train": len(train_people), "test": len(test_people)}, "stages_s": stages,
              "evaluation": report}  # fmt: skip
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result, f, indent=1)
    shutil.copy(os.path.join(out, "eval", "accuracy_vs_shots.png"), os.path.join(out, "accuracy_vs_shots.png"))
    print("\n" + summary(report))
    print("\nstages: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in stages.items()))
    print(f"report: {out}/report.json  plot: {out}/accuracy_vs_shots.png  split: {out}/split.json")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
