"""The demo's recipe, one process, no Ray: how SFT and IPO settings move held-out accuracy over shots.

Trains `tiny` on synthetic users with the project's episodes, packed log-probs and losses (AdamW, 2
threads), then reports, on held-out users: accuracy at each k in `eval_shots` (the implicit reward
against the SFT reference) beside the ideal reader of the same shots, the on-task rate of greedy
answers, and the oracle win rate of the IPO model's answers against the SFT model's (both orders).
docs/benchmarks.md's recipe tables come from these runs, e.g.

    .venv/bin/python benchmarks/demo_recipe.py dims=2 noise=0.1 shots=6 eval_shots=[0,1,2,4,6] \
        sft_examples=9600 ipo_examples=9600 sft_dir=/tmp/sft-6

`sft_dir` saves the SFT model (and reuses it on the next run with the same settings).
"""

import copy
import math
import os
import random
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf

from fspo_ray import models
from fspo_ray.data.episodes import build_episodes, shot_sets
from fspo_ray.data.prompts import strip_completion_header
from fspo_ray.data.synthetic import (
    bayes_optimal_choice,
    make_users,
    on_task,
    score_answer,
    user_pairs,
)
from fspo_ray.data.tokenize import PromptStyle, fit_shot_set, render_episode, tokenize_text
from fspo_ray.evaluate.accuracy import paired_interval
from fspo_ray.logprobs import pack, packed_logps
from fspo_ray.losses import preference_loss, sft_loss

DEFAULTS = dict(
    hidden=128, inter=256, layers=3, heads=4, vocab=1024, n_train=256, n_test=64, pairs=16, shots=3, passes=3,
    targets=1, eval_shots=[0, 1, 2, 3], preferred_only=True, dims=1, noise=0.0, batch=8, sft_examples=9600, sft_lr=3e-3,
    sft_target="chosen", ipo_examples=14400, ipo_lr=1e-3, beta=0.1, sft_weight=2.0, kind="ipo", label_smoothing=0.0,
    schedule="cosine", warmup=5, eval_eps=256, gen=64, seed=0, sft_dir="", ipo_eval_every=0, threads=2,
    every_combination=False,  # training and held-out users hold every pole combination alike (make_users)
    eval_targets=1,  # held-out targets per window of shots: 4 gives the demo's 1,024 held-out episodes
    min_shots=None,  # each training window draws its shot count from min_shots..shots (episodes.py)
    train_noise=None,  # the training users' label noise, where it differs from the held-out users' (`noise`)
)


def main(argv: list[str]) -> None:
    cfg = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(argv))
    print(OmegaConf.to_yaml(cfg).replace("\n", " "), flush=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    models.TINY.update(hidden_size=cfg.hidden, intermediate_size=cfg.inter, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads)  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = f"/tmp/demo-recipe-model-{cfg.hidden}-{cfg.layers}-{cfg.heads}-{cfg.vocab}-{os.getpid()}"
    models.build_tiny_model(path, vocab_size=cfg.vocab, seed=cfg.seed)
    tok = AutoTokenizer.from_pretrained(path)
    users = make_users(cfg.n_train, cfg.n_test, cfg.dims, held_out_combinations=not cfg.every_combination)
    prefs = {u.user_id: u.preferences for u in users}
    novel = {u.user_id for u in users if u.novel_combination}
    noise = {"train": cfg.noise if cfg.train_noise is None else cfg.train_noise, "test": cfg.noise}
    pairs = {split: [p for u in users if u.split == split for p in user_pairs(u, cfg.pairs, cfg.seed, noise[split])]
             for split in ("train", "test")}  # fmt: skip
    style = PromptStyle(preferred_only=cfg.preferred_only)
    train_eps, _ = build_episodes(pairs["train"], shots=cfg.shots, passes=cfg.passes, seed=cfg.seed,
                                  targets=cfg.targets, min_shots=cfg.min_shots)
    test_eps, _ = build_episodes(pairs["test"], shots=max(cfg.eval_shots), passes=1, seed=cfg.seed,
                                 targets=cfg.eval_targets)
    random.Random(0).shuffle(test_eps)
    test_eps = test_eps[: cfg.eval_eps]
    fit = dict(max_length=768, max_prompt_length=640, style=style)
    # A shot set's K targets stay together (one packed row, one batch): batches are drawn as whole shot sets.
    train_sets = [[f.tokens for f in fit_shot_set(group, tok, **fit)] for group in shot_sets(train_eps)]
    train_rows = [row for group in train_sets for row in group]
    print(f"train episodes {len(train_rows)}, mean tokens "
          f"{statistics.mean(len(t['prompt_ids']) + len(t['chosen_ids']) for t in train_rows):.0f}; "
          f"held-out episodes {len(test_eps)}", flush=True)  # fmt: skip

    def packed(rows, rejected=True):
        return pack([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows],
                    [r["rejected_ids"] for r in rows] if rejected else None, tok.pad_token_id,
                    shots_lengths=[r["shots_length"] for r in rows] if "shots_length" in rows[0] else None)  # fmt: skip

    def batches(n_examples, seed):
        rng, order = random.Random(seed), []
        while len(order) < n_examples:
            more = list(range(len(train_sets)))
            rng.shuffle(more)
            order += [row for j in more for row in train_sets[j]]
        for i in range(0, n_examples - cfg.batch + 1, cfg.batch):
            yield order[i : i + cfg.batch]

    def lr_factor(step, total):
        if step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        done = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return 1.0 if cfg.schedule == "constant" else 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    def train(model, loss_name, n_examples, lr, ref=None):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        total = n_examples // cfg.batch
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total))
        model.train()
        started = time.time()
        for step, rows in enumerate(batches(n_examples, cfg.seed + (loss_name != "sft"))):
            if loss_name == "sft":
                both = cfg.sft_target == "both"
                logps = packed_logps(model, packed(rows, both))
                loss = sft_loss(logps if both else logps[: len(rows)])
            else:
                batch = packed(rows)
                policy_chosen, policy_rejected = packed_logps(model, batch).chunk(2)
                with torch.no_grad():
                    ref_chosen, ref_rejected = packed_logps(ref, batch).chunk(2)
                losses, _, _ = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                               beta=cfg.beta, kind=cfg.kind, sft_weight=cfg.sft_weight,
                                               label_smoothing=cfg.label_smoothing)  # fmt: skip
                loss = losses.mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            if step % 200 == 0:
                print(f"  {loss_name} step {step}/{total} loss {loss.item():.3f} {time.time() - started:.0f}s", flush=True)
            if cfg.ipo_eval_every and ref is not None and step and step % cfg.ipo_eval_every == 0:
                print(f"   @{step}", accuracy(model, ref)["model"], flush=True)
                model.train()
        print(f"  {loss_name} done in {time.time() - started:.0f}s", flush=True)

    # The ideal reader of each k-shot prompt (the newest k shots): the same at every evaluation, so worked out once.
    ideal_verdicts = {k: [
        bayes_optimal_choice([(s.preferred, s.dispreferred) for s in e.shots[len(e.shots) - k :]],
                             (e.query.preferred, e.query.dispreferred), cfg.dims, label_noise=cfg.noise,
                             preferred_only=cfg.preferred_only)
        for e in test_eps] for k in cfg.eval_shots}  # fmt: skip
    ideal = {k: round(statistics.mean(v), 3) for k, v in ideal_verdicts.items()}

    @torch.no_grad()
    def accuracy(model, ref):
        model.eval()
        right = {k: [] for k in cfg.eval_shots}
        reference_alone = {k: [] for k in cfg.eval_shots}  # does the reference (SFT) itself rank them right?
        for k in cfg.eval_shots:
            for i in range(0, len(test_eps), 32):
                chunk = test_eps[i : i + 32]
                rows = [tokenize_text(tok, render_episode(e, style, len(e.shots) - k)) for e in chunk]
                batch = packed(rows)
                policy_chosen, policy_rejected = packed_logps(model, batch).chunk(2)
                ref_chosen, ref_rejected = packed_logps(ref, batch).chunk(2)
                right[k] += ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected) > 0).tolist()
                reference_alone[k] += (ref_chosen - ref_rejected > 0).tolist()
        n = len(test_eps)
        table = {"model": {k: round(sum(v) / n, 3) for k, v in right.items()}, "ideal": ideal}
        table["reference log-likelihood alone"] = {k: round(sum(v) / n, 3) for k, v in reference_alone.items()}
        # Half the held-out users hold pole combinations no training user holds (synthetic.py).
        seen = [e.user_id not in novel for e in test_eps]
        for name, keep in (("seen combinations", True), ("novel combinations", False)):
            table[name] = {k: round(statistics.mean(r for r, s in zip(v, seen) if s == keep), 3)
                           for k, v in right.items()} if keep in seen else {}  # fmt: skip
        # Below the ideal reader, paired: each episode's ideal verdict minus the model's, with a 95% interval.
        table["below ideal [95% CI]"] = {}
        for k, v in right.items():
            mean, ci = paired_interval([i - r for i, r in zip(ideal_verdicts[k], v)])
            table["below ideal [95% CI]"][k] = [round(x, 3) for x in (mean, *ci)]
        last = max(cfg.eval_shots)
        diffs = [100.0 * (a - b) for a, b in zip(right[last], right[1])] if 1 in right else []
        if diffs:
            mean, ci = paired_interval(diffs)
            table["gain_last_over_1"] = [round(x, 1) for x in (mean, *ci)]
        return table

    @torch.no_grad()
    def answers(model):
        model.eval()
        tok.padding_side = "left"
        out = []
        for i in range(0, cfg.gen, 32):
            chunk = test_eps[i : min(i + 32, cfg.gen)]
            prompts = [render_episode(e, style).prompt for e in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            generated = model.generate(**enc, max_new_tokens=96, do_sample=False, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id)  # fmt: skip
            for g in generated[:, enc["input_ids"].shape[1] :]:
                out.append(strip_completion_header(tok.decode(g, skip_special_tokens=True),
                                                   preferred_only=cfg.preferred_only)[1])  # fmt: skip
        return out

    def win_rate(ours, theirs):
        wins = losses = 0
        for e, a, b in zip(test_eps, ours, theirs):
            q, p = e.query.question, prefs[e.user_id]
            sa, sb = score_answer(a, p, q), score_answer(b, p, q)
            wins, losses = wins + (sa > sb), losses + (sb > sa)
        return round(wins / max(1, wins + losses), 3), wins, losses

    started = time.time()
    reuse_sft = bool(cfg.sft_dir) and os.path.exists(cfg.sft_dir)
    policy = AutoModelForCausalLM.from_pretrained(cfg.sft_dir if reuse_sft else path, attn_implementation="sdpa")
    if not reuse_sft:
        train(policy, "sft", cfg.sft_examples, cfg.sft_lr)
        if cfg.sft_dir:
            policy.save_pretrained(cfg.sft_dir)
    sft = copy.deepcopy(policy).eval().requires_grad_(False)
    sft_answers = answers(sft)
    print("SFT on task", sum(on_task(a, e.query.question) for a, e in zip(sft_answers, test_eps)) / cfg.gen)
    train(policy, "ipo", cfg.ipo_examples, cfg.ipo_lr, ref=sft)
    ours = answers(policy)
    print("IPO", accuracy(policy, sft), "on task",
          sum(on_task(a, e.query.question) for a, e in zip(ours, test_eps)) / cfg.gen,
          "win rate vs SFT", win_rate(ours, sft_answers), flush=True)  # fmt: skip
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
