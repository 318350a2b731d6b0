"""The personalization service: a Ray Serve deployment with a FastAPI ingress.

    serve run serve/config.yaml                     # edit model, backend, replicas there
    curl -s localhost:8000/v1/personalize -H 'Content-Type: application/json' \
         -d '{"history": [...], "query": "How do I bake bread?"}'

The prompt is built by the same code as training (fspo_ray.data), tokenized without a BOS, and the
answer comes back without its "## Preferred Response" header. Request bodies (users' histories) are
never logged or stored.
"""

from __future__ import annotations

import json
import os
import time

from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from fspo_ray.data.prompts import Shot, answer_start, strip_completion_header
from fspo_ray.data.tokenize import PromptStyle, fit_prompt
from fspo_ray.models import resolve_model
from fspo_ray.serve.api import PersonalizeRequest, PersonalizeResponse, Usage
from fspo_ray.serve.engine import Generation, Sampling, TransformersEngine, make_engine
from fspo_ray.train.export import read_run_info

api = FastAPI(
    title="fspo-ray personalization API",
    description="A user's labelled preferences plus a question in, an answer written for that user out.",
)


@serve.deployment
@serve.ingress(api)
class Personalizer:
    def __init__(self, model: str, backend: str = "auto", api_key_env: str = "FSPO_API_KEY",
                 max_requests_per_replica: int = 32):  # fmt: skip
        from ray.util import metrics

        path = resolve_model(model)
        self.preferred_only = bool(read_run_info(path).get("preferred_only", False))
        self.engine = make_engine(backend, path)
        self.model_name = os.path.basename(os.path.dirname(path)) if path.endswith("LATEST") else os.path.basename(path)
        self.api_key = os.environ.get(api_key_env) or None
        self.max_requests, self.in_flight = max_requests_per_replica, 0
        tags = ("model", "backend")
        self.requests = metrics.Counter("fspo_requests", "Personalize requests by status.", ("status", *tags))
        self.latency = metrics.Histogram("fspo_request_latency_s", "Request latency.",
                                         [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tags)  # fmt: skip
        self.first_token = metrics.Histogram("fspo_time_to_first_token_s", "Time to the first streamed token.",
                                             [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5], tags)  # fmt: skip
        self.tokens = metrics.Counter("fspo_tokens_generated", "Completion tokens generated.", tags)
        self.tags = {"model": self.model_name, "backend": self.engine.name}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name, "backend": self.engine.name}

    @api.post("/v1/personalize", response_model=PersonalizeResponse)
    async def personalize(self, request: PersonalizeRequest, authorization: str | None = Header(default=None)):
        started = time.perf_counter()
        if self.api_key and authorization != f"Bearer {self.api_key}":
            return self._error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        if self.in_flight >= self.max_requests:
            return self._error(503, "overloaded: too many requests in flight; retry shortly", {"Retry-After": "1"})
        self.in_flight += 1
        try:
            return await self._personalize(request, started)
        except HTTPException as e:
            return self._error(e.status_code, e.detail)
        finally:
            self.in_flight -= 1

    def _error(self, status: int, detail: str, headers: dict | None = None) -> JSONResponse:
        self.requests.inc(tags={"status": str(status), **self.tags})
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    async def _personalize(self, request: PersonalizeRequest, started: float):
        if request.rationalize:
            mode = "generated"
        else:
            mode = "teacher_forced" if request.user_description else "none"
        style = PromptStyle(preferred_only=self.preferred_only and mode == "none", description_mode=mode)
        shots = tuple(Shot(s.question.strip(), s.preferred.strip(), s.dispreferred.strip()) for s in request.history)
        budget = self.engine.max_model_len - request.max_new_tokens
        fitted = fit_prompt(shots, request.query.strip(), self.engine.tokenizer, budget, style=style,
                            user_description=request.user_description)  # fmt: skip
        if fitted is None:
            raise HTTPException(413, f"the query alone does not fit the model's context of {self.engine.max_model_len}"
                                     f" tokens with max_new_tokens={request.max_new_tokens}")  # fmt: skip
        prompt, dropped = fitted
        sampling = Sampling(request.max_new_tokens, request.temperature, request.top_p, request.seed)
        meta = {"prompt_tokens": len(prompt), "shots_used": len(shots) - dropped, "shots_dropped": dropped}
        if request.stream:
            return StreamingResponse(self._events(prompt, sampling, request, style, meta, started),
                                     media_type="text/event-stream")  # fmt: skip
        generation = await self._generate(prompt, sampling)
        return self._response(generation.text, generation.completion_tokens, request, style, meta, started)

    def _response(self, text: str, completion_tokens: int, request: PersonalizeRequest, style: PromptStyle,
                  meta: dict, started: float) -> PersonalizeResponse:  # fmt: skip
        """The finished answer, streamed or not: its header stripped, its request counted."""
        self.requests.inc(tags={"status": "200", **self.tags})
        self.latency.observe(time.perf_counter() - started, tags=self.tags)
        self.tokens.inc(completion_tokens, tags=self.tags)
        description, answer = strip_completion_header(text, preferred_only=style.preferred_only)
        return PersonalizeResponse(
            response=answer,
            user_description=description if request.rationalize else request.user_description,
            model=self.model_name,
            usage=Usage(prompt_tokens=meta["prompt_tokens"], completion_tokens=completion_tokens),
            shots_used=meta["shots_used"],
            shots_dropped=meta["shots_dropped"],
        )

    async def _generate(self, prompt: list[int], sampling: Sampling) -> Generation:
        if isinstance(self.engine, TransformersEngine):
            return await self._batched(prompt, sampling)
        return await self.engine.generate(prompt, sampling)  # vLLM batches continuously itself

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, prompts: list[list[int]], samplings: list[Sampling]) -> list[Generation]:
        """Concurrent requests with the same sampling settings share one generate call."""
        import asyncio

        results: dict[int, Generation] = {}
        groups: dict[Sampling, list[int]] = {}
        for i, sampling in enumerate(samplings):
            groups.setdefault(sampling, []).append(i)
        for sampling, members in groups.items():
            outputs = await asyncio.to_thread(self.engine.generate_batch, [prompts[i] for i in members], sampling)
            results.update(zip(members, outputs))
        return [results[i] for i in range(len(prompts))]

    async def _events(self, prompt, sampling, request, style, meta, started):
        """Server-sent events: {"token": ...} for each piece of the answer, then the full response."""
        text, shown, first = "", 0, True
        async for piece in self.engine.stream(prompt, sampling):
            if first:
                self.first_token.observe(time.perf_counter() - started, tags=self.tags)
                first = False
            text += piece
            body_start = answer_start(text, preferred_only=style.preferred_only)
            if body_start is None:
                continue  # still inside the description or the header
            shown = max(shown, body_start)
            if len(text) > shown:
                yield f"data: {json.dumps({'token': text[shown:]})}\n\n"
                shown = len(text)
        completion_tokens = len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        final = self._response(text, completion_tokens, request, style, meta, started)
        yield f"data: {final.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"


def app_builder(args: dict):
    """`serve run serve/config.yaml` builds the application from the config's `args`."""
    return Personalizer.bind(**args)
