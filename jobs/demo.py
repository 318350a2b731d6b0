"""The embedded demo: synthetic users → SFT → IPO (2 Ray Train workers, DeepSpeed) → evaluation →
a personalized answer over HTTP beside the base model's. `make demo` runs it with jobs/demo.yaml.

    python -m jobs.demo config=jobs/demo.yaml [key=value ...]
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from fspo_ray.config import parse_overrides, run_job


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # everything the demo writes: data, runs, evaluation
    model: str = "tiny"  # the model to personalize: a preset or a local HF folder
    n_train_users: int = 256  # synthetic users to train on
    n_test_users: int = 64  # held-out synthetic users for evaluation and serving
    pairs_per_user: int = 16  # labelled preference pairs per user
    dims_per_user: int = 1  # properties each user cares about (synthetic.py)
    train_dims_per_user: list[int] | None = None  # training users' property counts, cycled (default: dims_per_user)
    label_noise: float = 0.0  # the fraction of each user's pairs whose labels are flipped (synthetic.py)
    train_label_noise: float | None = None  # the training users' flip rate where it differs (default: label_noise)
    held_out_combinations: bool = True  # half the held-out users hold pole combinations no training user holds
    shots: int = 3  # preference pairs in each prompt
    min_shots: int | None = None  # training prompts hold min_shots..shots pairs (drawn per window); default: shots
    passes: int = 3  # training episodes per user = passes * K * (pairs_per_user // (shots + K))
    targets_per_prompt: int = 1  # K: episodes sharing one window of shots, in training and evaluation (speed)
    preferred_only: bool = True  # shots show the preferred answer only (the reference's preferred-only prompt)
    batch_size: int = 8  # episodes per optimizer step
    max_length: int = 512  # prompt + completion tokens
    max_prompt_length: int = 384  # prompt tokens
    sft_examples: int = 9600  # episodes of few-shot SFT
    sft_lr: float = 3e-3  # SFT learning rate
    sft_target: str = "chosen"  # SFT on the preferred answer (the paper) | both answers (the released code)
    lr_schedule: str = "cosine"  # both stages, after warmup: cosine (decays to 0: answers on the asked task) | constant
    ipo_examples: int = 14400  # episodes of few-shot IPO
    ipo_lr: float = 1e-3  # IPO learning rate
    ipo_beta: float = 0.1  # IPO beta
    ipo_sft_weight: float = 2.0  # weight of the preferred answer's NLL added to IPO (loss.sft_weight)
    lora_r: int = 0  # LoRA adapter rank for both stages (0: train every weight); the export is merged
    lora_alpha: float = 16.0  # LoRA scale: adapters add (lora_alpha / lora_r) · B·A
    length_window: int = 0  # order training episodes by length inside seeded windows of this many; 0: shuffled
    train_eval_examples: int = 64  # held-out episodes each training stage scores (its curves); 0: none
    eval_episodes: int = 256  # held-out episodes scored at every number of shots
    eval_queries: int = 64  # held-out queries for the win rate
    backend: str = "transformers"  # the service's engine; auto picks vLLM where it runs (slower to start)
    port: int = 8000  # the service's loopback port
    seed: int = 0  # seeds data, training and evaluation
    verbose: bool = False  # show Ray's and the libraries' output on the console (else: out/demo.log only)


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main(argv: list[str]) -> dict:
    from fspo_ray.console import job_console

    cfg = parse_overrides(DemoConfig, argv)
    out = os.path.abspath(cfg.out)
    log = os.path.join(out, "demo.log")
    print(f"fspo-ray demo: everything lands in {out}; Ray's and the libraries' output in {log}", flush=True)
    with job_console(log, cfg.verbose):  # a caller's Ray (tests, a notebook) is joined and left running
        return _demo(cfg, out, log)


def _demo(cfg: DemoConfig, out: str, log: str) -> dict:
    import httpx
    from ray import serve

    from fspo_ray.data.readers import read_pairs
    from fspo_ray.data.synthetic import write_synthetic
    from fspo_ray.evaluate.run import EvaluateConfig, evaluate
    from fspo_ray.train.config import parse_train_config
    from fspo_ray.train.run import run_training
    from jobs.evaluate import summary
    from serve.app import build_app

    started = time.perf_counter()

    _step("1/5 synthetic users: preferences known exactly, held-out users unseen in training")
    data = write_synthetic(
        os.path.join(out, "data"), n_train_users=cfg.n_train_users, n_test_users=cfg.n_test_users,
        pairs_per_user=cfg.pairs_per_user, dims_per_user=cfg.dims_per_user, train_dims_per_user=cfg.train_dims_per_user,
        label_noise=cfg.label_noise, train_label_noise=cfg.train_label_noise,
        held_out_combinations=cfg.held_out_combinations, seed=cfg.seed,
    )  # fmt: skip
    fewer = [f"min_shots={cfg.min_shots}"] if cfg.min_shots is not None else []
    held_out = [f"eval_datasets=[{data['test']}]", f"n_eval_examples={cfg.train_eval_examples}",
                "eval_batch_size=32"] if cfg.train_eval_examples else []  # fmt: skip
    common = [*held_out, *fewer, f"model={cfg.model}", f"datasets=[{data['train']}]",
              f"shots={cfg.shots}", f"passes={cfg.passes}", f"preferred_only={cfg.preferred_only}",
              f"batch_size={cfg.batch_size}", f"max_length={cfg.max_length}",
              f"max_prompt_length={cfg.max_prompt_length}", f"storage_path={out}/runs", "zero_stage=2",
              "optimizer=AdamW", "warmup_steps=5", f"lr_schedule={cfg.lr_schedule}",
              f"length_window={cfg.length_window}", f"targets_per_prompt={cfg.targets_per_prompt}",
              f"lora.r={cfg.lora_r}", f"lora.alpha={cfg.lora_alpha}", f"seed={cfg.seed}"]  # fmt: skip
    answers = "preferred answers" if cfg.sft_target == "chosen" else "preferred and dispreferred answers"
    _step(f"2/5 few-shot SFT on the {answers} (2 Ray Train workers, DeepSpeed ZeRO-2)")
    sft = parse_train_config([*common, "loss=sft", f"lr={cfg.sft_lr}", f"sft_target={cfg.sft_target}",
                              f"n_examples={cfg.sft_examples}", "exp_name=sft", "do_first_eval=false"])  # fmt: skip
    fitted = {}  # both stages train on the same episodes: built and tokenized once
    run_training(sft, fitted)
    _step("3/5 few-shot IPO from the SFT model, referenced to it")
    ipo = parse_train_config([*common, "loss=ipo", f"loss.beta={cfg.ipo_beta}", f"lr={cfg.ipo_lr}",
                              f"loss.sft_weight={cfg.ipo_sft_weight}", f"n_examples={cfg.ipo_examples}",
                              "exp_name=ipo", f"model.archive={sft.run_dir}", "eval_every=4000",
                              # one one-thread scorer per CPU: faster than one scorer on both (docs/benchmarks.md)
                              "reference_concurrency=2"])  # fmt: skip
    run_training(ipo, fitted)

    # The win rate's opponent is the SFT model: on task but not personalized (the base model answers nothing
    # the oracle could prefer, so a win over it says little).
    _step("4/5 evaluation on held-out users: accuracy over shots, oracle win rate vs the SFT model")
    report = evaluate(EvaluateConfig(
        model=ipo.run_dir, datasets=[data["test"]], users_file=data["users"], out=os.path.join(out, "eval"),
        max_shots=cfg.shots, n_episodes=cfg.eval_episodes, n_queries=cfg.eval_queries, seed=cfg.seed,
        targets_per_prompt=cfg.targets_per_prompt,
        baselines=["bayes_optimal"], pref_ft=sft.run_dir, opponent="pref_ft",
        overwrite=True,  # the demo's own folder: a re-run evaluates again
    ))  # fmt: skip
    print(summary(report))

    _step("5/5 the personalization service over HTTP: one held-out user's request")
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(model=ipo.run_dir, backend=cfg.backend), name="fspo", route_prefix="/")
    serve.run(build_app(model=cfg.model, backend=cfg.backend), name="base", route_prefix="/base")
    pairs = list(read_pairs(data["test"]))
    user = pairs[0].user_id
    mine = [p for p in pairs if p.user_id == user]
    history = [{"question": p.question, "preferred": p.preferred, "dispreferred": p.dispreferred}
               for p in mine[: cfg.shots]]  # fmt: skip
    request = {"history": history, "query": mine[cfg.shots].question, "max_new_tokens": 64}
    url = f"http://127.0.0.1:{cfg.port}"
    personalized = httpx.post(f"{url}/v1/personalize", json=request, timeout=300).json()
    base = httpx.post(f"{url}/base/v1/personalize", json={**request, "history": []}, timeout=300).json()
    users = json.load(open(data["users"]))
    print(f"user {user}: {users[user]['description']} (the model only saw {len(history)} of their choices)")
    print(f"question: {request['query']}\n--- personalized model:\n{personalized['response']}\n"
          f"--- base model:\n{base['response'] or '(an empty answer: it stopped at once)'}")  # fmt: skip
    for app in ("fspo", "base"):  # not serve.shutdown(): killing the controller mid-shutdown prints retry errors
        serve.delete(app)

    print(f"\nreport: {out}/eval/report.json  plot: {out}/eval/accuracy_vs_shots.png  "
          f"per user: {out}/eval/per_user.csv\nmodel: {ipo.run_dir}/LATEST  "
          f"training curves: {ipo.run_dir}/metrics.jsonl  log: {log}\ndone in {time.perf_counter() - started:.0f} s")  # fmt: skip
    return {"report": report, "personalized": personalized, "base": base}


if __name__ == "__main__":
    run_job(main)
