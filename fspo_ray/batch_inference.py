"""Batch inference: a Ray Data dataset of prompts continued by replicas that each hold one engine, as
evaluation and data generation run it (serving holds its engines in Serve replicas instead)."""

from __future__ import annotations

from dataclasses import replace

from fspo_ray.engines import Sampling, make_engine
from fspo_ray.scheduling import replica_cpus, resolve_use_gpu


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The model's input for `prompt`: with `chat`, a user message in the model's chat template (where it
    has one), answered by the assistant; otherwise the text as it is, without BOS, as in training."""
    if chat and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


class BatchGenerator:
    """A Ray Data actor holding one engine (batch inference): continues each row's `prompt` and adds its
    `text`, `completion_tokens` and `error` (None, or why that prompt failed: its batch-mates are unaffected).

    `chat=True` sends each prompt as a user message through the model's chat template (instruction-tuned
    models); otherwise the prompt text is the model's input as it is, without BOS, as in training.
    `choices` (texts of one token each in this model's vocabulary, a judge's "m" and "M") makes the answer
    one of them; texts that are not single tokens leave the answer free."""

    def __init__(self, model_path: str, backend: str, sampling: Sampling, chat: bool = False,
                 choices: tuple[str, ...] | None = None):  # fmt: skip
        self.engine = make_engine(backend, model_path)
        self.sampling, self.chat = sampling, chat
        ids = [self.engine.tokenizer.encode(c, add_special_tokens=False) for c in choices or ()]
        if ids and all(len(i) == 1 for i in ids):
            self.sampling = replace(sampling, max_new_tokens=1, allowed_token_ids=tuple(i[0] for i in ids))

    async def __call__(self, batch: dict) -> dict:
        ids = [prompt_ids(self.engine.tokenizer, p, self.chat) for p in batch["prompt"]]
        results = await self.engine.generate_all(ids, self.sampling)
        failed = [isinstance(r, Exception) for r in results]
        return {
            **batch,
            "text": ["" if bad else r.text for r, bad in zip(results, failed)],
            "completion_tokens": [0 if bad else r.completion_tokens for r, bad in zip(results, failed)],
            "error": [f"{type(r).__name__}: {r}" if bad else None for r, bad in zip(results, failed)],
        }


def batch_generate(rows: list[dict], model_path: str, backend: str, sampling: Sampling, *, batch_size: int,
                   concurrency: int, chat: bool = False, choices: tuple[str, ...] | None = None,
                   use_gpu: bool | None = None):
    """A Ray Data dataset of `rows` continued by `concurrency` BatchGenerator replicas, one GPU each with
    `use_gpu` (None: when the cluster has GPUs), spread over the nodes; the caller consumes it, all at once
    or as replicas finish."""
    import ray.data

    use_gpu = resolve_use_gpu(use_gpu)
    return ray.data.from_items(rows).map_batches(
        BatchGenerator,
        fn_constructor_kwargs={"model_path": model_path, "backend": backend, "sampling": sampling, "chat": chat,
                               "choices": choices},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=replica_cpus(concurrency, use_gpu), num_gpus=1 if use_gpu else 0,
        scheduling_strategy="SPREAD",  # replicas on every node that has room, not packed onto the first
    )  # fmt: skip
