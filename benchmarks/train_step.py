"""An IPO training step, side by side: the plain concatenated step, the shared-prompt step (one row per
episode), the multi-target step (one row per shot set: the shots once, then its K targets), each of the
two on precomputed reference scores too, and TRL's DPOTrainer (ipo) with and without
precompute_ref_log_probs; then whole `jobs.train` runs (at K=1 and K=`--targets`) against whole TRL runs.

    make bench                                     # sets up .venv-trl (TRL) and runs both models
    .venv/bin/python benchmarks/train_step.py --model tiny --batch-size 8
    .venv/bin/python benchmarks/train_step.py --model smollm2-135m --batch-size 4 --steps 1 --runs 0

Every trial is a fresh process (so peak memory is that variant's own), on the same 8-shot synthetic episodes
(full prompts: both answers of every shot), drawn K=`--targets` to a window of shots and kept together, so a
batch holds whole shot sets; every variant reads the same episodes in the same batches, only the multi-target
ones compute a shot set's shots once. Same model, batch, AdamW and learning rate, on `--threads` threads.
Trials alternate between variants, `--repeats` times; a variant's rate is the median over its trials of
`batch / median step time`. For the precomputed variants the reference pass's time is counted in, amortized
over the episodes it scored. The whole-run part times `jobs.train` (one worker, loss=ipo, one epoch) and
TRL's trainer on N and 2N episodes: the difference cancels fixed start-up (Ray, imports, loading).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_PYTHON = os.path.join(ROOT, ".venv-trl", "bin", "python")
VARIANTS = ("concatenated", "shared", "shared+precomputed", "multi-target", "multi-target+precomputed", "trl",
            "trl+precompute")  # fmt: skip
OURS = VARIANTS[:5]


def write_episodes(
    out_dir: str, model_path: str, shots: int, count: int, targets: int, seed: int = 0
) -> tuple[str, str, str]:
    """`count` episodes of synthetic users, `targets` to a window of shots, as token rows (ours) and as text
    (TRL's input), the same episodes in the same order, shot sets shuffled whole; and the synthetic users'
    data file (for jobs.train)."""
    import random

    from transformers import AutoTokenizer

    from fspo_ray.data.episodes import build_episodes, shot_sets
    from fspo_ray.data.readers import read_pairs
    from fspo_ray.data.synthetic import write_synthetic
    from fspo_ray.data.tokenize import render_episode, tokenize_text

    windows = max(2, -(-count // (64 * targets)))  # windows a user needs so that 64 users give `count`
    users = write_synthetic(os.path.join(out_dir, "users"), n_train_users=64, n_test_users=2,
                            pairs_per_user=windows * (shots + targets), seed=seed)  # fmt: skip
    episodes, _ = build_episodes(read_pairs(users["train"]), shots=shots, passes=1, seed=seed, targets=targets)
    sets = shot_sets(episodes)
    random.Random(seed).shuffle(sets)
    episodes = [e for shot_set in sets for e in shot_set]
    if len(episodes) < count:
        raise SystemExit(f"only {len(episodes)} episodes, {count} needed")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokens_path, text_path = os.path.join(out_dir, "tokens.jsonl"), os.path.join(out_dir, "text.jsonl")
    with open(tokens_path, "w") as tokens_file, open(text_path, "w") as text_file:
        for episode in episodes[:count]:
            text = render_episode(episode)
            tokens_file.write(json.dumps(tokenize_text(tokenizer, text)) + "\n")
            as_text = {"prompt": text.prompt, "chosen": text.chosen, "rejected": text.rejected}
            text_file.write(json.dumps(as_text) + "\n")
    return tokens_path, text_path, users["train"]


def worker(args) -> dict:
    """One trial of one of our variants, in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    from fspo_ray.logprobs import SHOTS_LENGTH, CompletionLogps, CompletionScorer, pack, plain_logps
    from fspo_ray.losses import preference_loss
    from fspo_ray.train.config import LossConfig
    from fspo_ray.train.step import batch_loss, collate

    torch.set_num_threads(args.threads)
    with open(args.tokens) as f:
        rows = [json.loads(line) for line in f][: (args.warmup + args.steps) * args.batch_size]
    if not args.worker.startswith("multi-target"):  # each episode its own row: nothing says what rows share
        rows = [{k: v for k, v in row.items() if k != SHOTS_LENGTH} for row in rows]
    loss_cfg = LossConfig(name="ipo", beta=0.1)
    reference_s = 0.0
    precomputed = args.worker.endswith("+precomputed")
    if precomputed:  # the reference pass, as training's (reference.py) runs it
        started = time.perf_counter()
        scorer = CompletionScorer({"reference": args.model_path}, "float32")
        batch = {c: [r[c] for r in rows] for c in rows[0]}
        scores = scorer(batch)
        for i, row in enumerate(rows):
            for side in ("chosen", "rejected"):
                row[f"reference_{side}"] = scores[f"reference_{side}"][i]
        reference_s = time.perf_counter() - started
        del scorer
        gc.collect()

    def load():
        return AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32, attn_implementation="sdpa")

    policy = load().train()
    reference = None if precomputed else load().eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    # The policy and reference as a training step calls them: in the module training hands to DeepSpeed.
    scorers = CompletionLogps(policy), CompletionLogps(reference) if reference is not None else None
    pad = 0
    step_s, tokens, computed = [], 0, 0
    for step in range(args.warmup + args.steps):
        chunk = rows[step * args.batch_size : (step + 1) * args.batch_size]
        columns = {c: [r[c] for r in chunk] for c in chunk[0]}
        started = time.perf_counter()
        if args.worker == "concatenated":  # the step as it was: both rows through both models, full logits
            packed = pack(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"], pad)
            policy_logps = plain_logps(policy, packed)
            with torch.no_grad():
                reference_logps = plain_logps(reference, packed)
            loss = preference_loss(*policy_logps.chunk(2), *reference_logps.chunk(2), beta=0.1, kind="ipo")[0].mean()
        else:
            batch = collate(columns, pad, "cpu", with_rejected=True)
            loss, _ = batch_loss(*scorers, batch, loss_cfg, "chosen", "train")
            computed += batch.packed.tokens if step >= args.warmup else 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            step_s.append(time.perf_counter() - started)
            tokens += sum(len(r[c]) for r in chunk for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return {"step_s": step_s, "precompute_ref_s": reference_s if precomputed else None,
            "tokens_per_example": tokens / (args.steps * args.batch_size),
            "computed_tokens_per_example": computed / (args.steps * args.batch_size) or None,  # tokens a forward ran
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def _result(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def trial(variant: str, args, model_path: str, tokens: str, text: str) -> dict:
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--threads", str(args.threads)]  # fmt: skip
    if variant.startswith("trl"):
        extra = ["--precompute-ref"] if variant == "trl+precompute" else []
        return _result([TRL_PYTHON, "benchmarks/trl_worker.py", "--model", model_path, "--episodes", text,
                        "--loss", "ipo", "--beta", "0.1", "--lr", "1e-5", *common, *extra])  # fmt: skip
    return _result([sys.executable, "benchmarks/train_step.py", "--worker", variant, "--model-path", model_path,
                    "--tokens", tokens, *common])  # fmt: skip


def seconds_per_example(result: dict, args) -> float:
    """Median step time per example, plus the reference pass amortized over the episodes it scored."""
    per_example = statistics.median(result["step_s"]) / args.batch_size
    if result.get("precompute_ref_s"):
        per_example += result["precompute_ref_s"] / ((args.warmup + args.steps) * args.batch_size)
    return per_example


def step_table(args, model_path: str, tokens: str, text: str) -> list[dict]:
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for repeat in range(args.repeats):
        for variant in args.variants:  # alternating: a slow spell of the machine hits every variant alike
            results[variant].append(trial(variant, args, model_path, tokens, text))
            rate = 1 / seconds_per_example(results[variant][-1], args)
            said = f"  repeat {repeat + 1}/{args.repeats} {variant:<20} {rate:8.2f} examples/s"
            print(said, file=sys.stderr, flush=True)
    table = []
    for variant, trials in results.items():
        rates = [1 / seconds_per_example(r, args) for r in trials]
        per_token = trials[0]["tokens_per_example"]
        table.append({"variant": variant, "examples_per_s": statistics.median(rates), "min": min(rates),
                      "max": max(rates), "tokens_per_s": statistics.median(rates) * per_token,
                      "tokens_per_example": per_token, "peak_rss_mb": max(r["peak_rss_mb"] for r in trials),
                      "computed_tokens_per_example": trials[0].get("computed_tokens_per_example")})  # fmt: skip
    return table


def whole_runs(args, model_path: str, text: str, data: str) -> dict:
    """Seconds per example of whole runs, from the difference of N- and 2N-episode runs (fixed costs cancel):
    jobs.train at each K of `--run-targets`, TRL on the first N and 2N of the same text episodes."""
    n = args.runs
    systems = [f"jobs.train K={k}" for k in args.run_targets] + ["trl"]
    times: dict[str, dict[int, list[float]]] = {system: {n: [], 2 * n: []} for system in systems}
    from fspo_ray.data.readers import read_pairs

    pairs = list(read_pairs(data))
    pairs_per_user = sum(p.user_id == pairs[0].user_id for p in pairs)  # write_episodes gives each user as many
    for repeat in range(args.run_repeats):
        for size in (n, 2 * n):
            for k in args.run_targets:
                # Passes enough for 2N episodes at this K, the same for N and 2N (tokenizing them cancels too).
                per_pass = 64 * (pairs_per_user // (args.shots + k)) * k
                with tempfile.TemporaryDirectory() as runs:
                    command = [sys.executable, "-m", "jobs.train", f"model={model_path}", f"datasets=[{data}]",
                               f"shots={args.shots}", f"targets_per_prompt={k}", f"passes={-(-2 * n // per_pass)}",
                               "loss=ipo", "loss.beta=0.1", "lr=1e-5", "optimizer=AdamW",
                               f"batch_size={args.batch_size}", f"n_examples={size}", "num_workers=1", "warmup_steps=0",
                               "max_length=4096", "max_prompt_length=4096", "debug=true", f"storage_path={runs}",
                               "exp_name=bench"]  # fmt: skip
                    started = time.perf_counter()
                    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                    if done.returncode:
                        raise SystemExit(f"jobs.train failed:\n{done.stderr[-3000:]}")
                    times[f"jobs.train K={k}"][size].append(time.perf_counter() - started)
            first = os.path.join(os.path.dirname(text), f"first{size}.jsonl")  # TRL tokenizes all it is given
            with open(text) as f, open(first, "w") as out:
                out.writelines(line for _, line in zip(range(size), f))
            started = time.perf_counter()
            _result([TRL_PYTHON, "benchmarks/trl_worker.py", "--model", model_path, "--episodes", first,
                     "--batch-size", str(args.batch_size), "--steps", str(size // args.batch_size), "--warmup", "0",
                     "--threads", str(args.threads), "--lr", "1e-5"])  # fmt: skip
            times["trl"][size].append(time.perf_counter() - started)
            said = ", ".join(f"{system} {t[size][-1]:.1f} s" for system, t in times.items())
            print(f"  whole runs, repeat {repeat + 1}: {size} episodes: {said}", file=sys.stderr, flush=True)
    return {system: (statistics.median(t[2 * n]) - statistics.median(t[n])) / n for system, t in times.items()} | {
        "raw_s": times
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="a preset (tiny, smollm2-135m) or a local HF folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--targets", type=int, default=4, help="K: episodes per shot set (the multi-target variants' rows)")
    p.add_argument("--run-targets", type=int, nargs="+", default=[1, 4], help="the K of each jobs.train whole run")
    p.add_argument("--steps", type=int, default=4, help="timed steps per trial")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=256, help="N of the whole-run comparison (N vs 2N episodes); 0: skip")
    p.add_argument("--run-repeats", type=int, default=2, help="repeats of the whole-run comparison")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="the step variants to time (trl among them: the ratios' base)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", choices=OURS, help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "trl" not in args.variants:
        p.error("--variants must include trl: every ratio is against it")
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    if not os.path.exists(TRL_PYTHON):
        raise SystemExit("TRL's environment is missing: run `make bench-setup-trl` (or `make bench`)")
    from fspo_ray.models import resolve_model

    model_path = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        count = max((args.warmup + args.steps) * args.batch_size, 2 * args.runs)
        tokens, text, data = write_episodes(tmp, model_path, args.shots, count, args.targets)
        table = step_table(args, model_path, tokens, text)
        runs = whole_runs(args, model_path, text, data) if args.runs else None
    by = {row["variant"]: row for row in table}
    concatenated = by["concatenated"]["examples_per_s"] if "concatenated" in by else float("nan")
    print(f"\n{args.model}: IPO step, {args.shots}-shot full-prompt episodes ({args.targets} to a shot set), "
          f"batch {args.batch_size}, {args.threads} threads, {args.repeats} alternating repeats (median [min, max])")
    print(f"{'variant':<25} {'s/step':>7} {'examples/s':>26} {'tokens/s':>9} {'computed':>8} {'peak MB':>8} "
          f"{'× TRL ipo':>9} {'× concatenated':>14}")  # fmt: skip
    for row in table:
        print(f"{row['variant']:<25} {args.batch_size / row['examples_per_s']:7.2f} {row['examples_per_s']:8.4f} "
              f"[{row['min']:7.4f}, {row['max']:7.4f}] {row['tokens_per_s']:9.1f} "
              f"{row.get('computed_tokens_per_example') or float('nan'):8.0f} {row['peak_rss_mb']:8.0f} "
              f"{row['examples_per_s'] / by['trl']['examples_per_s']:9.2f} "
              f"{row['examples_per_s'] / concatenated:14.2f}")  # fmt: skip
    if runs:
        print(f"whole runs (one worker, {args.runs} vs {2 * args.runs} episodes, start-up cancelled), s/example: "
              + ", ".join(f"{system} {runs[system]:.4f} ({runs['trl'] / runs[system]:.2f}× TRL)"
                          for system in runs if system != "raw_s"))  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "args": vars(args), "steps": table, "whole_runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
