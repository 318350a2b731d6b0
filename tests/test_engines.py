"""The transformers engine's failure handling, on the real tiny model: a failing request fails alone,
a crashed or stalled stream ends instead of hanging, a cancelled stream stops generating, and the
health probe tells a wedged engine from a busy one."""

import asyncio
import time

import pytest

from fspo_ray.data.prompts import build_prompt
from fspo_ray.engines import EngineStalled, Generation, Sampling, TransformersEngine

# Logits divided by this temperature overflow fp32 to inf/nan probabilities: a real engine error, the
# kind the API's validation now keeps out (temperature 0 or >= 1e-3).
CRASHING = Sampling(max_new_tokens=8, temperature=1e-300)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from fspo_ray.models import build_tiny_model

    return TransformersEngine(build_tiny_model(str(tmp_path_factory.mktemp("model") / "tiny")))


def prompt(engine, question: str) -> list[int]:
    """The FSPO prompt's ids: the random tiny model answers it with newlines, which a streamer sends
    piece by piece (it holds back text until a space or newline)."""
    return engine.tokenizer(build_prompt((), question), add_special_tokens=False)["input_ids"]


def test_a_failing_request_fails_alone_in_its_batch(engine):
    prompts = [prompt(engine, f"How do I cook {dish}?") for dish in ("rice", "pasta", "beans", "soup")]
    greedy, sampled = Sampling(max_new_tokens=6), Sampling(max_new_tokens=6, temperature=0.7, seed=1)
    results = engine.generate_many(prompts, [greedy, CRASHING, greedy, sampled])
    assert isinstance(results[1], RuntimeError)
    alone = [engine.generate_batch([prompts[i]], s)[0] for i, s in ((0, greedy), (2, greedy))]
    assert results[0] == alone[0] and results[2] == alone[1]  # batch-mates answered as if alone
    assert isinstance(results[3], Generation) and results[3].completion_tokens == 6


async def collect(stream) -> list[str]:
    return [piece async for piece in stream]


def test_a_stream_whose_generate_crashes_raises_instead_of_hanging(engine):
    stream = engine.stream(prompt(engine, "Hi?"), CRASHING, stall_timeout_s=60)
    with pytest.raises(RuntimeError, match="probability|inf|nan"):
        asyncio.run(asyncio.wait_for(collect(stream), 30))  # the old engine waited here forever
    assert asyncio.run(collect(engine.stream(prompt(engine, "Hi?"), Sampling(4), 60)))  # and still works


def test_a_stream_ends_when_the_engine_stops_producing(engine):
    """A generate that holds the model and produces nothing (here: the lock held, no token since) ends
    a waiting stream after the stall timeout; the probe reports the same engine as wedged."""
    engine.lock.acquire()
    try:
        engine.last_progress = time.monotonic() - 100
        with pytest.raises(EngineStalled, match="no progress for 0.5 s"):
            asyncio.run(asyncio.wait_for(collect(engine.stream(prompt(engine, "Hi?"), Sampling(4), 0.5)), 30))
        problem = asyncio.run(engine.probe(timeout_s=5, stall_timeout_s=5))
        assert problem is not None and "generating, but no progress for 10" in problem
        engine.last_progress = time.monotonic()  # busy and producing: healthy
        assert asyncio.run(engine.probe(timeout_s=5, stall_timeout_s=5)) is None
    finally:
        engine.lock.release()
    assert asyncio.run(engine.probe(timeout_s=5, stall_timeout_s=5)) is None  # idle: a one-token generate works


def test_the_health_probes_token_is_not_counted_as_generated(tmp_path):
    """/healthz's `tokens_generated` counts requests' tokens: Serve's probe every 5 s adds none. (An engine
    of its own: the shared one may still finish a cancelled stream's token.)"""
    from fspo_ray.models import build_tiny_model

    engine = TransformersEngine(build_tiny_model(str(tmp_path / "tiny")))
    assert asyncio.run(engine.probe(timeout_s=5, stall_timeout_s=5)) is None
    assert engine.tokens_generated == 0
    engine.generate_batch([prompt(engine, "Hi?")] * 2, Sampling(max_new_tokens=3))  # the random model: no EOS
    assert engine.tokens_generated == 2 * 3


def test_a_slow_prefill_is_progress_not_a_stall(engine):
    """A prompt whose prefill takes over a second without a token (each of the tiny model's layers slowed
    to 0.3 s on the prompt's pass): a stream with a 0.5 s stall timeout waits it out and answers, and the
    probe meanwhile finds the engine busy, not wedged. Only a stamp per layer can tell: no token comes."""
    prefilling = []

    def slow_prefill(module, args):
        if args[0].shape[1] > 1:  # the prompt's pass; each decoding step has one position
            prefilling.append(1)
            time.sleep(0.3)

    while engine.generating:  # a stream an earlier test left still ends its generate
        time.sleep(0.01)
    layers = engine.model.get_decoder().layers
    assert len(layers) >= 2  # else the prefill would be one stall-length wait, which a token stamp also covers
    hooks = [layer.register_forward_pre_hook(slow_prefill) for layer in layers]

    async def stream_and_probe():
        stream = asyncio.create_task(collect(engine.stream(prompt(engine, "Hi?"), Sampling(4), 0.5)))
        while not prefilling:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.6)  # past the stall timeout, still in the prefill
        return await engine.probe(timeout_s=5, stall_timeout_s=0.5), await stream

    try:
        problem, pieces = asyncio.run(asyncio.wait_for(stream_and_probe(), 30))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(prefilling) >= len(layers) and problem is None and pieces


def test_closing_a_stream_stops_its_generate(engine):
    """The consumer leaves after the first piece of a 1,024-token answer: the model stops within a few
    forward passes (counted by a hook on the model) instead of generating all 1,024 tokens."""
    forwards = []
    hook = engine.model.register_forward_hook(lambda *_: forwards.append(1))

    async def first_piece_then_leave():
        stream = engine.stream(prompt(engine, "Tell me everything."), Sampling(1024), 60)
        assert await anext(stream)
        await stream.aclose()

    try:
        asyncio.run(first_piece_then_leave())
        deadline = time.monotonic() + 60
        while engine.generating and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        hook.remove()
    assert not engine.generating
    assert len(forwards) < 100, len(forwards)  # the random tiny model never writes EOS: 1,024 if not stopped


def test_choices_make_the_answer_the_models_likelier_choice(tmp_path):
    """A judge's reply constrained to m or M is the one of the two the model scores higher, prompt by
    prompt (checked on prompts where the random tiny model picks each of them)."""
    import torch

    from fspo_ray.batch_inference import BatchGenerator
    from fspo_ray.models import build_tiny_model

    model_path = build_tiny_model(str(tmp_path / "tiny"))
    generator = BatchGenerator(model_path, "transformers", Sampling(3), choices=("m", "M"))
    model, tokenizer = generator.engine.model, generator.engine.tokenizer
    m, big_m = tokenizer.convert_tokens_to_ids(["m", "M"])
    prompts = [f"Question {i}: which answer? {'x' * i}" for i in range(24)]
    with torch.no_grad():
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        last = [model(torch.tensor([i])).logits[0, -1] for i in ids]
    expected = ["m" if logits[m] > logits[big_m] else "M" for logits in last]
    assert set(expected) == {"m", "M"}  # the prompts do move the model's choice
    assert asyncio.run(generator({"prompt": prompts}))["text"] == expected


def test_vllm_streams_wait_through_engine_steps_and_stall_without_them():
    """vLLM's side, with a stand-in for its AsyncLLM (its steps stamp progress as the engine's stat logger
    does): a first token after 1 s of steps (a chunked prefill) is no stall at a 0.3 s timeout, and the
    stream ends with the whole Generation; the same wait without steps is one."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from fspo_ray.engines import VLLMEngine

    vllm = object.__new__(VLLMEngine)  # no engine started: the stand-in below is the AsyncLLM
    vllm.tokens_generated, vllm.per_request_seeds, vllm.last_progress = 0, False, time.monotonic()

    class Prefilling:
        def __init__(self, steps: bool):
            self.steps = steps

        def generate(self, prompt, params, request_id):
            async def outputs():
                for _ in range(10):
                    await asyncio.sleep(0.1)
                    if self.steps:
                        vllm.last_progress = time.monotonic()
                completion = SimpleNamespace(text="Hello", token_ids=[7, 8], finish_reason="length")
                yield SimpleNamespace(outputs=[completion], num_cached_tokens=0)

            return outputs()

    vllm.engine = Prefilling(steps=True)
    pieces = asyncio.run(collect(vllm.stream([1, 2, 3], Sampling(2), 0.3)))
    assert pieces == ["Hello", Generation("Hello", 2, 0, "length")] and vllm.tokens_generated == 2
    vllm.engine.check_health, vllm.tokenizer = lambda: asyncio.sleep(0), SimpleNamespace(eos_token_id=0)
    assert asyncio.run(vllm.probe(timeout_s=5, stall_timeout_s=5)) is None
    assert vllm.tokens_generated == 2  # the probe's request is not a client's
    vllm.engine = Prefilling(steps=False)
    with pytest.raises(EngineStalled, match="no progress for 0.3 s"):
        asyncio.run(collect(vllm.stream([1, 2, 3], Sampling(2), 0.3)))
