"""TRL's DPOTrainer timed on the same episodes as fspo_ray: the baseline of the benchmarks.

Runs in its own virtualenv (`make bench-setup-trl` builds .venv-trl): TRL 1.16 needs a newer transformers
than the project's venv allows. It never imports fspo_ray.

    .venv-trl/bin/python benchmarks/trl_worker.py --model DIR --episodes FILE.jsonl --batch-size 8 \\
        --steps 4 --warmup 1 [--precompute-ref] --loss ipo --beta 0.1 --lr 1e-5 --threads 2

FILE.jsonl holds one {"prompt", "chosen", "rejected"} object of plain text per line; the completions carry no
EOS (TRL appends the tokenizer's EOS). Everything TRL and transformers print goes to stderr; stdout gets one
line, `RESULT {json}`.

How TRL 1.16 treats the data (read from trl/trainer/dpo_trainer.py, trl/data_utils.py):
- Plain strings are "non-conversational": no chat template is applied. TRL appends `tokenizer.eos_token` to
  chosen and rejected as text, tokenizes `prompt` and `prompt + completion` with `tokenizer(text=...)`
  (default `add_special_tokens=True`) and splits at their common prefix. A tokenizer that adds a BOS (or
  EOS) by itself is switched off here (`add_bos_token`/`add_eos_token = False`) so sequences match ours;
  the RESULT says whether that was needed.
- The policy and reference forwards score chosen and rejected as one batch of 2B sequences (the prompt is
  run twice), and TRL's fused LM head projects only the completion positions.
- Reference: with `ref_model=None` (TRL's normal use) TRL loads a second copy of the model from the same
  folder; with `precompute_ref_log_probs` it keeps none and scores every episode with the initial policy
  inside `DPOTrainer.__init__` (not inside `train()`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model folder (policy and reference)")
    p.add_argument("--episodes", required=True, help="JSONL of {prompt, chosen, rejected} plain-text episodes")
    p.add_argument("--batch-size", type=int, required=True, help="episodes per optimizer step")
    p.add_argument("--steps", type=int, required=True, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them")
    p.add_argument("--precompute-ref", action="store_true", help="TRL's precompute_ref_log_probs")
    p.add_argument("--loss", default="ipo", help="TRL loss_type")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return p.parse_args(argv)


def read_episodes(path: str) -> list[dict]:
    episodes = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(key), str):
                    raise SystemExit(f"{path}:{n}: '{key}' must be a string")
            episodes.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    if not episodes:
        raise SystemExit(f"{path}: no episodes")
    return episodes


def no_special_tokens(tokenizer) -> bool:
    """Switch off a BOS/EOS the tokenizer would add by itself; True if one had to be switched off."""
    probe = "Question: How do I X?"

    def adds():
        return tokenizer(text=probe)["input_ids"] != tokenizer(text=probe, add_special_tokens=False)["input_ids"]

    if not adds():
        return False
    for attr in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, attr):
            setattr(tokenizer, attr, False)
    if adds():
        raise SystemExit(
            "the tokenizer adds special tokens that add_bos_token/add_eos_token=False do not remove; "
            "TRL would put them in every sequence"
        )
    return True


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)

    import datasets
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import is_conversational

    # Precomputed reference log-probs are cached beside the dataset: a cache hit would skip the work we time.
    datasets.disable_caching()
    transformers.utils.logging.set_verbosity_warning()

    episodes = read_episodes(args.episodes)
    if is_conversational(episodes[0]):
        raise SystemExit("episodes must be plain text, not chat messages")
    dataset = datasets.Dataset.from_list(episodes)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    switched_off_special_tokens = no_special_tokens(tokenizer)

    class Timer(TrainerCallback):
        def __init__(self):
            self.first_begin = None
            self.begin = None
            self.step_s = []

        def on_step_begin(self, args_, state, control, **kwargs):
            self.begin = time.perf_counter()
            if self.first_begin is None:
                self.first_begin = self.begin

        def on_step_end(self, args_, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.begin)

    class TimedDPOTrainer(DPOTrainer):
        precompute_ref_s = 0.0

        def _precompute_ref_logps(self, *a, **kw):
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **kw)
            finally:
                self.precompute_ref_s += time.perf_counter() - t

    out_dir = tempfile.mkdtemp(prefix="trl-worker-")
    config = DPOConfig(
        output_dir=out_dir,
        loss_type=[args.loss],
        beta=args.beta,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        # Episodes in file order, as fspo_ray reads them.
        train_sampling_strategy="sequential",
        seed=0,
        data_seed=0,
        precompute_ref_log_probs=args.precompute_ref,
        disable_dropout=True,
        # CPU: fp32, no checkpointing, no truncation (TRL's default max_length=1024 would cut FSPO prompts).
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_length=None,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    timer = Timer()

    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(
        model=args.model,
        ref_model=None,  # TRL loads its own reference copy (none when precomputing)
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    init_s = time.perf_counter() - t0

    rows = trainer.train_dataset
    eos = tokenizer.eos_token_id
    if not all(r["chosen_ids"][-1:] == [eos] and r["rejected_ids"][-1:] == [eos] for r in rows):
        raise SystemExit("TRL's tokenized completions do not end with the tokenizer's EOS id")
    # TRL splits at the common prefix of tokenize(prompt) and tokenize(prompt + completion): a token merging
    # across the boundary moves the split.
    boundary_mismatches = sum(
        len(r["prompt_ids"]) != len(tokenizer(text=e["prompt"])["input_ids"]) for r, e in zip(rows, episodes)
    )
    lengths = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]

    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy="no": nothing to keep
    if len(timer.step_s) != args.warmup + args.steps:
        raise SystemExit(f"timed {len(timer.step_s)} steps, expected {args.warmup + args.steps}")

    return {
        "step_s": timer.step_s[args.warmup :],
        "warmup_step_s": timer.step_s[: args.warmup],
        # train() start to the first step: with precompute_ref TRL has already done that work in __init__.
        "pre_train_s": timer.first_begin - t1,
        "init_s": init_s,
        "precompute_ref_s": trainer.precompute_ref_s if args.precompute_ref else None,
        "train_s": train_s,
        "examples_per_step": args.batch_size,
        "tokens_per_example": sum(lengths) / len(lengths),
        "prompt_boundary_mismatches": boundary_mismatches,
        "tokenizer_special_tokens_switched_off": switched_off_special_tokens,
        "reference": "precomputed by the initial policy" if args.precompute_ref else "second copy loaded by TRL",
        "precompute_ref": bool(args.precompute_ref),
        "loss": args.loss,
        "threads": args.threads,
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Everything but the RESULT line goes to stderr, including what C extensions write to fd 1.
    sys.stdout.flush()
    result_fd = os.dup(1)
    os.dup2(2, 1)
    result = run(args)
    sys.stdout.flush()
    with os.fdopen(result_fd, "w") as out:
        out.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
