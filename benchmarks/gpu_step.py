"""The packed IPO step on one GPU, with torch and transformers alone (no Ray, no DeepSpeed, no hub).

    python benchmarks/gpu_step.py --out gpu_step.json      # a CUDA machine: a ~1B Llama built locally, bf16
    python benchmarks/gpu_step.py --reduced                # any CPU: a tiny shape in fp32, seconds

On the same synthetic episodes (random token ids shaped like FSPO's: 8 shots of ~90 tokens, a ~20-token
task and question, ~35-token answers; K targets to a shot set, a batch of whole shot sets), one IPO step
(policy forward and backward, reference forward, AdamW) of each variant:

- `multi-target flex`: one row per shot set, the shots once (fspo_ray.logprobs.pack), FlexAttention with
  a BlockMask built on the GPU from the rows' segment ids (what training picks on CUDA);
- `multi-target sdpa`: the same rows, SDPA with the dense mask built on the GPU;
- `shared flex`: one row per episode ([prompt | chosen | rejected], K=1);
- `plain`: prompt+chosen and prompt+rejected as two rows, full logits (fspo_ray.logprobs.plain_logps);
- `trl-style`: the same two rows per episode, the LM head only at answer positions (TRL 1.16's DPOTrainer).

It reports each variant's median step time, episode tokens per second (prompt + chosen + rejected of every
episode: the same work for all), the tokens its forward actually ran, MFU (the FLOPs the variant runs:
6·N·T for the policy and 2·N·T for the reference, N the non-embedding parameters, plus the LM head at the
positions it projects and attention over the pairs it computes, over the device's bf16 peak) and peak
memory; and how far packed log-probs are from the plain path's in bf16 (and in fp32). The FLOP count is
an estimate for comparing variants, not a profiler's. `--reduced` runs every variant FlexAttention can run
on a CPU (it has no backward there) in a few seconds; the test suite runs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fspo_ray from this checkout

from fspo_ray.attention import packed_attention_mask  # noqa: E402
from fspo_ray.logprobs import pack, packed_logps, plain_logps  # noqa: E402
from fspo_ray.losses import preference_loss  # noqa: E402

# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128_256)  # Llama-3.2-1B's shape, 1.24 B parameters  # fmt: skip
REDUCED = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256)  # fmt: skip


def episodes(count: int, targets: int, shots: int, shot_tokens: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token rows like tokenize.py's: a shot set's targets share their prompt's first `shots_length` ids."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(max(1, n))]

    rows = []
    while len(rows) < count:
        shared = ids(sum(rng.randint(shot_tokens * 3 // 4, shot_tokens * 5 // 4) for _ in range(shots)))
        for _ in range(targets):
            rows.append({"prompt_ids": shared + ids(rng.randint(15, 25)), "chosen_ids": ids(rng.randint(25, 45)) + [1],
                         "rejected_ids": ids(rng.randint(25, 45)) + [1], "shots_length": len(shared)})  # fmt: skip
    return rows[:count]


def trl_style_logps(model, prompts, chosen, rejected, device) -> torch.Tensor:
    """TRL's way: prompt+chosen and prompt+rejected as 2B right-padded rows, the LM head only at the positions
    that predict an answer token."""
    sequences = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    starts = [len(p) for p in prompts] * 2
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    source, target, sequence = [], [], []
    for i, (tokens, start) in enumerate(zip(sequences, starts)):
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        attention[i, : len(tokens)] = 1
        source += [i * width + t - 1 for t in range(start, len(tokens))]
        target += tokens[start:]
        sequence += [i] * (len(tokens) - start)
    hidden = model.get_decoder()(input_ids=input_ids.to(device), attention_mask=attention.to(device)).last_hidden_state
    logits = model.get_output_embeddings()(hidden.flatten(0, 1)[torch.tensor(source, device=device)]).float()
    token_logps = -F.cross_entropy(logits, torch.tensor(target, device=device), reduction="none")
    sums = torch.zeros(len(sequences), dtype=token_logps.dtype, device=device)
    return sums.index_add(0, torch.tensor(sequence, device=device), token_logps)


def _columns(rows: list[dict]) -> tuple[list, list, list]:
    return tuple([r[c] for r in rows] for c in ("prompt_ids", "chosen_ids", "rejected_ids"))


def logps_of(variant: str, model, rows: list[dict], device) -> torch.Tensor:
    """Chosen..., rejected... log-probs of `rows` the way `variant` computes them."""
    prompts, chosen, rejected = _columns(rows)
    if variant == "plain":
        return plain_logps(model, pack(prompts, chosen, rejected, 0, device))
    if variant == "trl-style":
        return trl_style_logps(model, prompts, chosen, rejected, device)
    shots = [r["shots_length"] for r in rows] if variant.startswith("multi-target") else None
    return packed_logps(model, pack(prompts, chosen, rejected, 0, device, shots))


def work_of(variant: str, rows: list[dict]) -> dict:
    """What one forward of `variant` runs on `rows`: tokens (padding included), positions the LM head
    projects, and (query, key) pairs attention computes."""
    prompts, chosen, rejected = _columns(rows)
    if variant.startswith(("multi-target", "shared")):
        shots = [r["shots_length"] for r in rows] if variant.startswith("multi-target") else None
        batch = pack(prompts, chosen, rejected, 0, "cpu", shots)
        pairs = int(packed_attention_mask(batch).sum())
        return {"tokens": batch.tokens + batch.padding, "projected": len(batch.target), "pairs": pairs}
    lengths = [len(p) + len(c) for p, c in zip(prompts, chosen)] + [len(p) + len(r) for p, r in zip(prompts, rejected)]
    width = max(lengths)
    answers = sum(len(c) + len(r) for c, r in zip(chosen, rejected))
    return {"tokens": width * len(lengths), "pairs": len(lengths) * width * (width + 1) // 2,
            "projected": width * len(lengths) if variant == "plain" else answers}  # fmt: skip


def flops(work: dict, config) -> float:
    """The FLOPs one IPO step runs: policy forward and backward (×3) and reference forward (×1) of the body,
    the LM head where it projects, and attention over the pairs it computes (QKᵀ and AV)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * d // config.num_attention_heads
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size)  # weights touched per token
    per_pass = 2 * body * work["tokens"] + 2 * d * config.vocab_size * work["projected"]
    per_pass += 4 * layers * d * work["pairs"]
    return 4 * per_pass


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(variant: str, policy, reference, rows: list[dict], args, device) -> dict:
    attention = "flex_attention" if "flex" in variant else "sdpa"
    for model in (policy, reference):
        model.set_attn_implementation(attention)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = []
    for step in range(args.warmup + args.steps):
        chunk = rows[step * args.batch_size : (step + 1) * args.batch_size]
        sync(device)
        started = time.perf_counter()
        logps = logps_of(variant, policy, chunk, device)
        with torch.no_grad():
            reference_logps = logps_of(variant, reference, chunk, device)
        loss = preference_loss(*logps.chunk(2), *reference_logps.chunk(2), beta=0.1, kind="ipo")[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            step_s.append(time.perf_counter() - started)
    timed = rows[args.warmup * args.batch_size :]  # every timed step's work, per step on average
    works = [work_of(variant, timed[i : i + args.batch_size]) for i in range(0, len(timed), args.batch_size)]
    work = {key: sum(w[key] for w in works) / args.steps for key in works[0]}
    episode_tokens = sum(len(r[c]) for r in timed for c in ("prompt_ids", "chosen_ids", "rejected_ids")) / args.steps
    seconds = statistics.median(step_s)
    peak = PEAK_TFLOPS.get(next((k for k in PEAK_TFLOPS if k in args.device_name), ""), args.peak_tflops)
    return {
        "variant": variant,
        "step_s": seconds,
        "episode_tokens_per_s": episode_tokens / seconds,
        "tokens_run_per_step": round(work["tokens"]),
        "mfu": flops(work, policy.config) / seconds / (peak * 1e12) if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


def agreement(policy, rows: list[dict], device, dtype) -> dict:
    """Packed (multi-target, each attention) against plain log-probs of the same weights in `dtype`, and both
    against the plain path in fp32: max absolute and relative differences over the batch's sequences."""
    model = copy.deepcopy(policy).to(dtype).eval()
    exact = copy.deepcopy(policy).float().eval()
    out = {}
    with torch.no_grad():
        truth = logps_of("plain", exact, rows, device).double()
        plain = logps_of("plain", model, rows, device).double()
        for variant in ("multi-target sdpa", "multi-target flex") if device.type == "cuda" else ("multi-target sdpa",):
            model.set_attn_implementation("flex_attention" if "flex" in variant else "sdpa")
            packed = logps_of(variant, model, rows, device).double()
            out[variant] = {
                "vs_plain_max_abs": float((packed - plain).abs().max()),
                "vs_plain_max_rel": float(((packed - plain).abs() / plain.abs()).max()),
                "vs_fp32_max_abs": float((packed - truth).abs().max()),
                "plain_vs_fp32_max_abs": float((plain - truth).abs().max()),
                "mean_abs_logp": float(plain.abs().mean()),
            }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reduced", action="store_true", help="a tiny shape in fp32 (on CPUs: what FlexAttention can run)")
    p.add_argument("--batch-size", type=int, default=16, help="episodes per step (whole shot sets)")
    p.add_argument("--targets", type=int, default=4, help="K: episodes per shot set")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--shot-tokens", type=int, default=90, help="mean tokens of one shot")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (compilation happens here)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, if its name is not known")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() and not args.reduced else "cpu")
    args.device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if args.reduced:
        args.batch_size, args.shot_tokens, args.steps, args.warmup = 8, 12, 1, 1
    dtype = torch.float32 if args.reduced else torch.bfloat16
    torch.manual_seed(0)
    config = LlamaConfig(**(REDUCED if args.reduced else FULL), tie_word_embeddings=True, attn_implementation="sdpa")
    started = time.perf_counter()
    with torch.device(device):
        policy = LlamaForCausalLM(config).to(dtype).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rows = episodes((args.warmup + args.steps) * args.batch_size, args.targets, args.shots, args.shot_tokens,
                    config.vocab_size)  # fmt: skip
    variants = ["multi-target sdpa", "plain", "trl-style"]
    if device.type == "cuda":  # FlexAttention has no backward on CPUs
        variants = ["multi-target flex", *variants, "shared flex"]
    print(f"{args.device_name}: Llama {sum(p.numel() for p in policy.parameters()) / 1e9:.2f} B parameters, "
          f"{dtype}, built in {time.perf_counter() - started:.0f} s; batch {args.batch_size}, "
          f"K={args.targets}, {args.shots} shots", flush=True)  # fmt: skip
    table = []
    for variant in variants:
        table.append(run_variant(variant, policy, reference, rows, args, device))
        print(json.dumps(table[-1]), flush=True)
    check = rows[: args.batch_size]
    result = {
        "device": args.device_name,
        "config": config.to_dict(),
        "args": vars(args),
        "steps": table,
        "agreement": {str(dtype): agreement(policy, check, device, dtype)},
    }
    if dtype != torch.float32:
        result["agreement"]["torch.float32"] = agreement(policy, check, device, torch.float32)
    plain = next(r for r in table if r["variant"] == "plain")["episode_tokens_per_s"]
    print(f"\n{'variant':<20} {'s/step':>8} {'episode tok/s':>14} {'× plain':>8} {'tokens run':>10} {'MFU':>6} "
          f"{'peak GB':>8}")  # fmt: skip
    for row in table:
        mfu = f"{row['mfu']:6.1%}" if row["mfu"] is not None else "     -"
        memory = f"{row['peak_memory_gb']:8.1f}" if row["peak_memory_gb"] is not None else "       -"
        print(f"{row['variant']:<20} {row['step_s']:8.3f} {row['episode_tokens_per_s']:14.0f} "
              f"{row['episode_tokens_per_s'] / plain:8.2f} {row['tokens_run_per_step']:10d} {mfu} "
              f"{memory}")  # fmt: skip
    print("log-prob agreement:", json.dumps(result["agreement"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
