"""The demo's recipe, one process, no Ray: how SFT and IPO settings move held-out accuracy and on-task answers.

Trains `tiny` on the demo's synthetic users with the project's episodes, packed log-probs and losses
(AdamW, 2 threads), then prints the SFT model's on-task rate, and after IPO the accuracy at 0-3 shots
(reward against the SFT reference, 256 held-out episodes) and the on-task rate of 64 greedy answers.
The README's table of recipe changes came from these runs, e.g.

    .venv/bin/python benchmarks/demo_recipe.py schedule=cosine sft_examples=9600 sft_dir=/tmp/sft \
        ipo_lr=1e-3 sft_weight=2 ipo_examples=6400 ipo_eval_every=200

`sft_dir` saves the SFT model (and reuses it on the next run with the same settings).
"""
import copy, math, os, random, sys, time
import torch
from omegaconf import OmegaConf

torch.set_num_threads(2)
from fspo_ray.data.synthetic import make_users, on_task, user_pairs
from fspo_ray.data.episodes import build_episodes
from fspo_ray.data.tokenize import PromptStyle, fit_episode, render_episode, tokenize_text
from fspo_ray.data.prompts import strip_completion_header
from fspo_ray.logprobs import pack, packed_logps
from fspo_ray.losses import preference_loss, sft_loss
from fspo_ray import models as M

cfg = OmegaConf.merge(dict(
    hidden=128, inter=256, layers=2, heads=4, vocab=1024, n_train=256, pairs=16, shots=3, passes=3,
    preferred_only=True, batch=8, sft_examples=8000, sft_lr=3e-3, ipo_examples=3200, ipo_lr=6e-4, beta=0.1,
    sft_weight=0.0, schedule="constant", warmup=5, eval_eps=256, gen=64, sft_target="chosen", seed=0,
    dims=1, sft_eval_every=0, sft_dir="", ipo_eval_every=0, kind="ipo", ipo_schedule=""), OmegaConf.from_cli(sys.argv[1:]))
print(OmegaConf.to_yaml(cfg).replace("\n", " "), flush=True)
torch.manual_seed(cfg.seed)
M.TINY.update(hidden_size=cfg.hidden, intermediate_size=cfg.inter, num_hidden_layers=cfg.layers,
              num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads)
path = f"/tmp/demo-recipe-model-{cfg.hidden}-{cfg.layers}-{cfg.heads}-{cfg.vocab}-{os.getpid()}"
M.build_tiny_model(path, vocab_size=cfg.vocab, seed=cfg.seed)
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
policy = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
print("params", sum(p.numel() for p in policy.parameters()))
users = make_users(cfg.n_train, 64, cfg.dims)
train_pairs = [p for u in users if u.split == "train" for p in user_pairs(u, cfg.pairs, cfg.seed)]
test_pairs = [p for u in users if u.split == "test" for p in user_pairs(u, 16, cfg.seed)]
prefs = {u.user_id: u.preferences for u in users}
style = PromptStyle(preferred_only=cfg.preferred_only)
train_eps, _ = build_episodes(train_pairs, shots=cfg.shots, passes=cfg.passes, seed=cfg.seed)
test_eps, _ = build_episodes(test_pairs, shots=3, passes=1, seed=cfg.seed)
rng = random.Random(0)
rng.shuffle(test_eps)
test_eps = test_eps[: cfg.eval_eps]
train_tok = [fit_episode(e, tok, max_length=512, max_prompt_length=384, style=style).tokens for e in train_eps]
print("train episodes", len(train_tok), "mean tokens", sum(len(t["prompt_ids"]) + len(t["chosen_ids"]) for t in train_tok) / len(train_tok), flush=True)


def stream(n_examples, seed):
    r = random.Random(seed)
    order = []
    while len(order) < n_examples:
        idx = list(range(len(train_tok)))
        r.shuffle(idx)
        order += idx
    order = order[:n_examples]
    for i in range(0, n_examples - cfg.batch + 1, cfg.batch):
        rows = [train_tok[j] for j in order[i : i + cfg.batch]]
        yield rows


def packed(rows, rejected=True):
    return pack([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows],
                [r["rejected_ids"] for r in rows] if rejected else None, tok.pad_token_id)


def lrf(step, total):
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1, (step - cfg.warmup) / max(1, total - cfg.warmup))))


def train(model, loss_name, n_examples, lr, ref=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    total = n_examples // cfg.batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lrf(s, total))
    model.train()
    t0 = time.time()
    for step, rows in enumerate(stream(n_examples, cfg.seed + (loss_name != "sft"))):
        if loss_name == "sft":
            lp = packed_logps(model, packed(rows, cfg.sft_target == "both"))
            loss = sft_loss(lp if cfg.sft_target == "both" else lp[: len(rows)])
        else:
            b = packed(rows)
            lp = packed_logps(model, b)
            with torch.no_grad():
                rl = packed_logps(ref, b)
            pc, pr = lp.chunk(2); rc, rr = rl.chunk(2)
            losses, _, _ = preference_loss(pc, pr, rc, rr, beta=cfg.beta, kind=cfg.kind, label_smoothing=0.0,
                                           reference_free=False, sft_weight=cfg.sft_weight)
            loss = losses.mean()
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step(); sched.step()
        if step % 200 == 0:
            print(f"  {loss_name} step {step}/{total} loss {loss.item():.3f} {time.time()-t0:.0f}s", flush=True)
        if cfg.ipo_eval_every and loss_name != "sft" and step and step % cfg.ipo_eval_every == 0:
            print(f"   @{step} on-task", ontask(model), "acc", accuracy(model, ref), flush=True); model.train()
        if cfg.sft_eval_every and loss_name == "sft" and step and step % cfg.sft_eval_every == 0:
            print("   on-task", ontask(model), flush=True); model.train()
    print(f"  {loss_name} done in {time.time()-t0:.0f}s", flush=True)


@torch.no_grad()
def accuracy(model, ref):
    model.eval()
    out = {}
    for k in range(4):
        hits = 0
        for i in range(0, len(test_eps), 32):
            rows = [tokenize_text(tok, render_episode(e, style, 3 - k)) for e in test_eps[i : i + 32]]
            b = packed(rows)
            pc, pr = packed_logps(model, b).chunk(2)
            rc, rr = packed_logps(ref, b).chunk(2)
            hits += int(((pc - rc) - (pr - rr) > 0).sum())
        out[k] = hits / len(test_eps)
    return out


@torch.no_grad()
def ontask(model, show=0):
    model.eval()
    ok = 0
    eps = test_eps[: cfg.gen]
    tok.padding_side = "left"
    for i in range(0, len(eps), 32):
        chunk = eps[i : i + 32]
        prompts = [render_episode(e, style).prompt for e in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=80, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for e, g in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(g, skip_special_tokens=True)
            _, ans = strip_completion_header(text, preferred_only=cfg.preferred_only)
            good = on_task(ans, e.query.question)
            ok += good
            if show and not good:
                show -= 1
                print("   OFF:", e.query.question, "->", repr(ans))
    return ok / len(eps)


t = time.time()
if cfg.sft_dir and os.path.exists(cfg.sft_dir):
    policy = AutoModelForCausalLM.from_pretrained(cfg.sft_dir, attn_implementation="sdpa")
else:
    train(policy, "sft", cfg.sft_examples, cfg.sft_lr)
    if cfg.sft_dir:
        policy.save_pretrained(cfg.sft_dir)
    print("SFT on-task", ontask(policy, show=3), flush=True)
sft = copy.deepcopy(policy).eval().requires_grad_(False)
if cfg.ipo_schedule:
    cfg.schedule = cfg.ipo_schedule
if cfg.ipo_examples:
    train(policy, "ipo", cfg.ipo_examples, cfg.ipo_lr, ref=sft)
    print("IPO on-task", ontask(policy, show=3), "acc", accuracy(policy, sft), flush=True)
print("total", time.time() - t)
