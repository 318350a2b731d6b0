"""The personalization service: a FastAPI ingress deployment in front of the engine's (serve/generator.py).

    serve run serve/config.yaml                     # edit model, backend, replicas there
    curl -s localhost:8000/v1/personalize -H 'Content-Type: application/json' \
         -d '{"history": [...], "query": "How do I bake bread?"}'

The ingress builds the prompt with the same code as training (fspo_ray.data), fitted to the run's length
limits, tokenized without a BOS, and sends its token ids to an engine replica chosen by user
(fspo_ray.serve.routing); the answer comes back without its "## Preferred Response" header. Its routes:
`/v1/personalize` (here), OpenAI's `/v1/models` and `/v1/chat/completions` (serve/openai_routes.py),
stored histories, feedback and the playground page (serve/histories.py). Request bodies are never logged;
a user's pairs are stored only when a client stores them.

A request is checked in the order that costs a bad client least of the replica: the API key (before
the body is read), admission (a bounded number generating, streams until they end), the body's size
(before it is parsed), then its fields. Every error is a small JSON `{"detail": ...}` (OpenAI's shape on
its routes); a server fault is a 500 with an `error_id` that the replica's log has.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from fspo_ray.data.prompts import Shot, answer_start, strip_completion_header
from fspo_ray.data.tokenize import PromptStyle, fit_prompt
from fspo_ray.engines import Generation, Sampling
from fspo_ray.runinfo import read_run_info
from fspo_ray.serve.api import (
    MAX_HISTORY,
    MAX_NEW_TOKENS,
    PersonalizeRequest,
    PersonalizeResponse,
    Usage,
    validation_error_body,
)
from fspo_ray.serve.chat import error_body
from fspo_ray.serve.store import StoreError, open_store
from serve.generator import Generator
from serve.histories import HistoryRoutes
from serve.ingress import ERRORS, AdmittedStream, Answer, PersonalizationAPI, Prompt, api, parsed_body
from serve.openai_routes import OpenAIRoutes

logger = logging.getLogger("ray.serve")
DEFAULT_MAX_NEW_TOKENS = 256  # what a request that does not say gets (or the server's limit, if lower)
EVENT_STREAM = {  # the schema of one server-sent event
    "description": "JSON, or with `\"stream\": true` server-sent events.",
    "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string",
        "description": 'JSON: `{"token": ...}` for each piece of the answer, then the full response (as the JSON'
                       ' answer) or `{"error": {"detail": ..., "error_id": ...}}`; the last event is `[DONE]`.',
    }}}}},
}  # fmt: skip


# Serve's own limits sit above the app's admission (max_requests_per_replica), so that overload is
# answered by the app, in JSON; the proxy's 503s (plain text) are left for a replica that cannot take
# even that. The engine runs in its own deployment (serve/generator.py), routed by user.
@serve.deployment(max_ongoing_requests=512, max_queued_requests=256, backpressure_config={"retry_after_s": 1},
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Personalizer(OpenAIRoutes, HistoryRoutes):
    async def __init__(self, generator: DeploymentHandle, api_key_env: str = "FSPO_API_KEY",
                       admin_key_env: str = "FSPO_ADMIN_KEY", max_requests_per_replica: int = 32,
                       max_body_bytes: int = 4 * 2**20, max_new_tokens_limit: int = MAX_NEW_TOKENS,
                       base_max_prompt_length: int = 1024, store_url: str = "~/.local/share/fspo-ray/histories.db",
                       max_pairs_per_user: int = 1_000):  # fmt: skip
        from ray.util import metrics
        from transformers import AutoTokenizer

        self.generator = generator
        engine = await generator.status.remote()  # the model as the engine resolved it: one build of a preset
        path, self.backend, self.max_model_len = engine["model_path"], engine["backend"], engine["max_model_len"]
        info = read_run_info(path)
        self.style = PromptStyle.from_run_info(info)  # the prompt the model was trained on
        # and its length limits (fit_episode's): a model without a run takes base_max_prompt_length tokens of
        # prompt and leaves the rest of its context to the answer.
        self.max_length = min(info.get("max_length", self.max_model_len), self.max_model_len)
        self.max_prompt_length = min(info.get("max_prompt_length", base_max_prompt_length), self.max_length)
        # The OpenAPI document shows the limit and the model: set on this module's app and on its class, as
        # the app Serve serves may be either (a pickled copy of it).
        self.max_new_tokens_limit = min(max_new_tokens_limit, MAX_NEW_TOKENS)
        for served in (api, PersonalizationAPI):
            served.max_new_tokens = self.max_new_tokens_limit
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # the engine's: prompts go to it as token ids
        self.model_name = os.path.basename(os.path.dirname(path)) if path.endswith("LATEST") else os.path.basename(path)
        api.served_model = PersonalizationAPI.served_model = self.model_name
        self.keys = {role: (os.environ.get(env) or "").encode() or None
                     for role, env in (("user", api_key_env), ("admin", admin_key_env))}  # fmt: skip
        self.store = open_store(store_url, max_pairs_per_user=max_pairs_per_user)
        self.max_requests, self.in_flight = max_requests_per_replica, 0
        self.max_body_bytes = max_body_bytes
        self.started = int(time.time())
        tags = ("model", "backend")
        self.requests = metrics.Counter("fspo_requests", "Requests by status.", ("status", *tags))
        self.engine_errors = metrics.Counter("fspo_engine_errors", "Requests the engine failed on.", tags)
        self.latency = metrics.Histogram("fspo_request_latency_s", "Request latency.",
                                         [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tags)  # fmt: skip
        self.first_token = metrics.Histogram("fspo_time_to_first_token_s", "Time to the first streamed token.",
                                             [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5], tags)  # fmt: skip
        self.tokens = metrics.Counter("fspo_tokens_generated", "Completion tokens generated.", tags)
        self.tags = {"model": self.model_name, "backend": self.backend}

    @api.get("/healthz", responses={503: {"description": "The engine failed its last probe; `detail` says how."}})
    async def healthz(self):
        """This ingress replica's requests in flight, and the state of an engine replica (the one routed to)."""
        engine = await self.generator.status.remote()
        problem, _ = engine.pop("problem"), engine.pop("model_path")  # a server's paths are not the client's
        body = {"status": "unhealthy" if problem else "ok", "model": self.model_name, "in_flight": self.in_flight,
                **engine}  # fmt: skip
        return JSONResponse({**body, "detail": problem}, status_code=503) if problem else body

    @api.post("/v1/personalize", response_model=PersonalizeResponse, responses={200: EVENT_STREAM, **ERRORS},
              openapi_extra=parsed_body(PersonalizeRequest))  # fmt: skip
    async def personalize(self, http: Request):
        return await self._handle(http, PersonalizeRequest, self._personalize, generating=True)

    # -- what every route shares: keys, admission, the body, errors --

    async def _handle(self, http: Request, body_model, run, *, admin: bool = False, generating: bool = False,
                      openai: bool = False):  # fmt: skip
        """`run(body, started)`'s answer, or the error that comes first: the key (401; 403 for an admin
        route without the admin key), admission for a route that generates (503), the body's size (413),
        its fields (422; OpenAI's 400 naming the `param`), the store's refusals, a fault (500)."""
        started = time.perf_counter()
        role = self._role(http.headers.get("authorization"))
        if role is None:
            return self._error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               {"WWW-Authenticate": "Bearer"}, openai=openai)  # fmt: skip
        if admin and role != "admin":
            why = "the admin key" if self.keys["admin"] else "the admin key, and none is set (FSPO_ADMIN_KEY)"
            return self._error(403, f"reading, deleting and exporting histories needs {why}", openai=openai)
        if generating and self.in_flight >= self.max_requests:
            return self._error(503, "overloaded: too many requests in flight; retry shortly", {"Retry-After": "1"},
                               openai=openai)  # fmt: skip
        self.in_flight += generating
        response = None
        try:
            body = body_model.model_validate_json(await self._body(http)) if body_model else None
            response = await run(body, started)
            return response
        except ValidationError as e:
            errors = validation_error_body(e.errors(include_url=False, include_context=False, include_input=False))
            if openai:
                first = errors["detail"][0]
                param = ".".join(map(str, first["loc"][1:])) or None
                return self._error(400, f"{param}: {first['msg']}" if param else first["msg"], openai=openai,
                                   param=param)  # fmt: skip
            self.requests.inc(tags={"status": "422", **self.tags})
            return JSONResponse(errors, status_code=422)
        except HTTPException as e:
            return self._error(e.status_code, e.detail, openai=openai)
        except StoreError as e:
            return self._error(e.status, str(e), openai=openai)
        except Exception as e:
            fault = self._fault(e)
            return JSONResponse(error_body(500, fault["detail"], code=fault["error_id"]) if openai else fault, 500)
        finally:
            if generating and not isinstance(response, AdmittedStream):
                self._release()

    def _role(self, header: str | None) -> str | None:
        """"admin", "user", or None for a missing or wrong key. The scheme is case-insensitive (RFC 9110
        §11.1); keys are compared in constant time."""
        scheme, _, token = (header or "").strip().partition(" ")
        token = token.strip().encode() if scheme.lower() == "bearer" else b""
        if self.keys["admin"] and hmac.compare_digest(token, self.keys["admin"]):
            return "admin"
        if self.keys["user"] is None or hmac.compare_digest(token, self.keys["user"]):
            return "user"
        return None

    def _release(self) -> None:
        self.in_flight -= 1

    async def _body(self, http: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be over the limit: before it is read when
        its declared length says so, else as soon as that many bytes have arrived."""
        too_big = HTTPException(413, f"the body is over the limit of {self.max_body_bytes} bytes")
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in http.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_big
        return bytes(body)

    def _error(self, status: int, detail: str, headers: dict | None = None, *, openai: bool = False,
               param: str | None = None) -> JSONResponse:  # fmt: skip
        self.requests.inc(tags={"status": str(status), **self.tags})
        body = error_body(status, detail, param) if openai else {"detail": detail}
        return JSONResponse(body, status_code=status, headers=headers)

    def _fault(self, error: Exception) -> dict:
        """The error body of a request the server failed on: logged by id and type, never with the
        user's text, and counted."""
        error_id = uuid.uuid4().hex[:16]
        logger.error("request %s failed: %s", error_id, type(error).__name__, exc_info=error)
        self.engine_errors.inc(tags=self.tags)
        self.requests.inc(tags={"status": "500", **self.tags})
        return {"detail": f"the server failed on this request ({type(error).__name__})", "error_id": error_id}

    # -- what every route that generates shares: the request's checks, its prompt, the engine --

    def _check(self, max_new_tokens: int | None, user_description: str | None, rationalize: bool = False,
               tokens_field: str = "max_new_tokens") -> int:  # fmt: skip
        """The tokens to generate (a request that does not say gets DEFAULT_MAX_NEW_TOKENS, within this
        server's limit). The prompt is always the one the model was trained on: a request that asks for
        another is a 422 naming the field, not a prompt the model never saw; so is one that asks for more
        tokens than this server generates."""
        mode, wrong = self.style.description_mode, None
        tokens = min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens_limit) if max_new_tokens is None else max_new_tokens
        if tokens > self.max_new_tokens_limit:
            wrong = (tokens_field, f"at most {self.max_new_tokens_limit} on this server")
        elif mode == "teacher_forced" and not user_description:
            wrong = ("user_description", "required: this model was trained with the user's description given")
        elif mode != "teacher_forced" and user_description:
            wrong = ("user_description", f"this model was trained with description_mode={mode}: it takes none")
        elif rationalize and mode != "generated":
            wrong = ("rationalize", f"this model was trained with description_mode={mode}: it writes no description")
        if wrong:
            raise ValidationError.from_exception_data(
                "Request", [{"type": "value_error", "loc": (wrong[0],), "input": None,
                             "ctx": {"error": ValueError(wrong[1])}}])  # fmt: skip
        return tokens

    async def _prompt(self, user_id: str | None, history: list, query: str, user_description: str | None,
                      sampling: Sampling) -> Prompt:  # fmt: skip
        """The user's stored pairs (the newest MAX_HISTORY), then the request's, fitted to the run's budget
        as training fits them: prompt <= max_prompt_length, and room for the answer within max_length.
        A query that does not fit even alone is a 413, before any prefill."""
        stored = await asyncio.to_thread(self.store.recent, user_id, MAX_HISTORY) if user_id else []
        shots = tuple(Shot(s.question.strip(), s.preferred.strip(), s.dispreferred.strip())
                      for s in [*reversed(stored), *history])  # fmt: skip
        budget = min(self.max_prompt_length, self.max_length - sampling.max_new_tokens)
        # Off the event loop: a long history takes a while to tokenize, and health checks must not wait.
        fitted = await asyncio.to_thread(fit_prompt, shots, query.strip(), self.tokenizer, budget, style=self.style,
                                         user_description=user_description)  # fmt: skip
        if fitted is None:  # refused before any prefill: a long query is a client's mistake, not the engine's work
            raise HTTPException(413, f"the query does not fit: this model's prompts hold at most {max(budget, 0)}"
                                     f" tokens (max_prompt_length={self.max_prompt_length}; max_length="
                                     f"{self.max_length} minus max_new_tokens={sampling.max_new_tokens})")  # fmt: skip
        ids, dropped = fitted
        # The prompt's first shot starts the part of it that is this user's: requests that share it share
        # cached KV blocks, on the replica the router keeps them on. A digest: the key travels with the call.
        user = user_id or (repr(shots[dropped]) if dropped < len(shots) else None)
        key = hashlib.blake2b(user.encode(), digest_size=16).hexdigest() if user else None
        return Prompt(ids, sampling, len(shots) - dropped, dropped, key)

    async def _generate(self, prompt: Prompt):
        """(the generation, the engine replica that wrote it). An engine replica lost mid-request (its node
        died, it was killed) costs the client nothing: Serve's router has marked it dead on that error, so
        the one retry goes to a live replica."""
        call = self.generator.generate
        try:
            return await call.remote(prompt.ids, prompt.sampling, affinity_key=prompt.affinity_key)
        except RayActorError as lost:
            logger.warning("an engine replica was lost mid-request (%s); trying another", type(lost).__name__)
            return await call.remote(prompt.ids, prompt.sampling, affinity_key=prompt.affinity_key)

    async def _answer_pieces(self, prompt: Prompt, answer: Answer, started: float):
        """The answer's text as the engine streams it, without the description or the header before it;
        `answer` keeps the whole text and the replica. Closed (its client left), the engine stops."""
        shown, first = 0, True
        pieces = self.generator.options(stream=True).stream.remote(prompt.ids, prompt.sampling,
                                                                   affinity_key=prompt.affinity_key)  # fmt: skip
        try:
            async for piece in pieces:
                if answer.replica is None:  # the engine's first item names its replica
                    answer.replica = piece
                    continue
                if isinstance(piece, Generation):  # and its last one is the whole answer
                    answer.completion_tokens, answer.finish_reason = piece.completion_tokens, piece.finish_reason
                    continue
                if first:
                    first = False
                    self.first_token.observe(time.perf_counter() - started, tags=self.tags)
                answer.text += piece
                body_start = answer_start(answer.text, preferred_only=self.style.preferred_only)
                if body_start is None:
                    continue  # still inside the description or the header
                shown = max(shown, body_start)
                if len(answer.text) > shown:
                    yield answer.text[shown:]
                    shown = len(answer.text)
        finally:
            pieces.cancel()  # the client left (or the stream ended): the engine stops generating

    def _count(self, completion_tokens: int, started: float) -> None:
        self.requests.inc(tags={"status": "200", **self.tags})
        self.latency.observe(time.perf_counter() - started, tags=self.tags)
        self.tokens.inc(completion_tokens, tags=self.tags)

    # -- /v1/personalize --

    async def _personalize(self, request: PersonalizeRequest, started: float):
        tokens = self._check(request.max_new_tokens if "max_new_tokens" in request.model_fields_set else None,
                             request.user_description, request.rationalize)  # fmt: skip
        sampling = Sampling(tokens, request.temperature, request.top_p, request.seed)
        prompt = await self._prompt(request.user_id, request.history, request.query, request.user_description,
                                    sampling)  # fmt: skip
        if request.stream:
            return AdmittedStream(self._personalize_events(prompt, request, started), self._release)
        generation, replica = await self._generate(prompt)
        return self._response(generation.text, generation.completion_tokens, generation.cached_prompt_tokens, replica,
                              request, prompt, started)  # fmt: skip

    def _response(self, text: str, completion_tokens: int, cached: int | None, replica: str,
                  request: PersonalizeRequest, prompt: Prompt, started: float) -> PersonalizeResponse:  # fmt: skip
        """The finished answer, streamed or not: its header stripped, its request counted."""
        self._count(completion_tokens, started)
        description, answer = strip_completion_header(text, preferred_only=self.style.preferred_only)
        return PersonalizeResponse(
            response=answer,
            user_description=description if self.style.description_mode == "generated" else request.user_description,
            model=self.model_name,
            replica=replica,
            usage=Usage(prompt_tokens=len(prompt.ids), completion_tokens=completion_tokens,
                        cached_prompt_tokens=cached),
            shots_used=prompt.shots_used,
            shots_dropped=prompt.shots_dropped,
        )

    async def _personalize_events(self, prompt: Prompt, request: PersonalizeRequest, started: float):
        """Server-sent events: {"token": ...} for each piece of the answer, then the full response; an
        {"error": ...} event instead if the engine fails or stalls midway."""
        answer = Answer()
        try:
            async for piece in self._answer_pieces(prompt, answer, started):
                yield f"data: {json.dumps({'token': piece})}\n\n"
        except Exception as e:
            yield f"data: {json.dumps({'error': self._fault(e)})}\n\n"
            yield "data: [DONE]\n\n"
            return
        final = self._response(answer.text, answer.completion_tokens, None, answer.replica, request, prompt, started)
        yield f"data: {final.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"


ENGINE_ARGS = ("model", "backend", "stall_timeout_s", "probe_timeout_s", "max_model_len", "kv_cache_gib",
               "gpu_memory_utilization")  # Generator's; the rest are Personalizer's


def build_app(**args):
    """The ingress bound to the engine deployment, each given its own of the config's `args`."""
    generator = Generator.bind(**{k: v for k, v in args.items() if k in ENGINE_ARGS})
    return Personalizer.bind(generator, **{k: v for k, v in args.items() if k not in ENGINE_ARGS})


def app_builder(args: dict):
    """`serve run serve/config.yaml` builds the application from the config's `args`."""
    return build_app(**args)
