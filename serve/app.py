"""The personalization service: a FastAPI ingress deployment in front of the engine's (serve/generator.py).

    serve run serve/config.yaml                     # edit model, backend, replicas there
    curl -s localhost:8000/v1/personalize -H 'Content-Type: application/json' \
         -d '{"history": [...], "query": "How do I bake bread?"}'

The ingress builds the prompt with the same code as training (fspo_ray.data), tokenized without a BOS,
and sends its token ids to an engine replica chosen by user (fspo_ray.serve.routing); the answer comes
back without its "## Preferred Response" header. Request bodies (users' histories) are
never logged or stored.

A request is checked in the order that costs a bad client least of the replica: the API key (before
the body is read), admission (a bounded number in flight, streams until they end), the body's size
(before it is parsed), then its fields. Every error is a small JSON `{"detail": ...}`; a server fault
is a 500 with an `error_id` that the replica's log has.
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

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from fspo_ray.data.prompts import Shot, answer_start, strip_completion_header
from fspo_ray.data.tokenize import PromptStyle, fit_prompt
from fspo_ray.engines import Sampling
from fspo_ray.runinfo import read_run_info
from fspo_ray.serve.api import (
    MAX_NEW_TOKENS,
    ErrorBody,
    PersonalizeRequest,
    PersonalizeResponse,
    Usage,
    ValidationErrorBody,
    validation_error_body,
)
from serve.generator import Generator

logger = logging.getLogger("ray.serve")

class PersonalizationAPI(FastAPI):
    max_new_tokens = MAX_NEW_TOKENS  # the served limit (the ingress sets it from its config)

    def openapi(self) -> dict:
        """FastAPI documents the bodies it parses itself; /v1/personalize parses its own, after the key and
        size checks, so its schema joins the document here, with the limit this server sets."""
        if self.openapi_schema is None:
            schema = super().openapi()
            request = PersonalizeRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            tokens = request["properties"]["max_new_tokens"]
            tokens["maximum"], tokens["default"] = self.max_new_tokens, min(tokens["default"], self.max_new_tokens)
            schema["components"]["schemas"].update(request.pop("$defs", {}), PersonalizeRequest=request)
        return self.openapi_schema


api = PersonalizationAPI(
    title="fspo-ray personalization API",
    description="A user's labelled preferences plus a question in, an answer written for that user out.",
)
ERRORS = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key (`Authorization: Bearer <key>`)."},
    413: {"model": ErrorBody, "description": "The body is over the size limit, or the query alone does not fit the"
                                             " prompt budget (`detail` names the limits)."},
    422: {"model": ValidationErrorBody, "description": "A field is invalid; `loc` names it."},
    500: {"model": ErrorBody, "description": "The server failed on this request alone; `error_id` is in the log."},
    503: {"model": ErrorBody, "description": "Overloaded: retry after the `Retry-After` header's seconds."},
}
EVENT_STREAM = {  # the schema of one server-sent event
    "description": "JSON, or with `\"stream\": true` server-sent events.",
    "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string",
        "description": 'JSON: `{"token": ...}` for each piece of the answer, then the full response (as the JSON'
                       ' answer) or `{"error": {"detail": ..., "error_id": ...}}`; the last event is `[DONE]`.',
    }}}}},
}  # fmt: skip


class AdmittedStream(StreamingResponse):
    """Server-sent events that hold their admission slot until the last event is sent or the client leaves."""

    def __init__(self, events, release):
        super().__init__(events, media_type="text/event-stream")
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


# Serve's own limits sit above the app's admission (max_requests_per_replica), so that overload is
# answered by the app, in JSON; the proxy's 503s (plain text) are left for a replica that cannot take
# even that. The engine runs in its own deployment (serve/generator.py), routed by user.
@serve.deployment(max_ongoing_requests=512, max_queued_requests=256, backpressure_config={"retry_after_s": 1},
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Personalizer:
    async def __init__(self, generator: DeploymentHandle, api_key_env: str = "FSPO_API_KEY",
                       max_requests_per_replica: int = 32, max_body_bytes: int = 4 * 2**20,
                       max_new_tokens_limit: int = MAX_NEW_TOKENS, base_max_prompt_length: int = 1024):  # fmt: skip
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
        # (on the class: Serve serves a pickled copy of `api`, whose OpenAPI document must show it too)
        self.max_new_tokens_limit = PersonalizationAPI.max_new_tokens = min(max_new_tokens_limit, MAX_NEW_TOKENS)
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # the engine's: prompts go to it as token ids
        self.model_name = os.path.basename(os.path.dirname(path)) if path.endswith("LATEST") else os.path.basename(path)
        api_key = os.environ.get(api_key_env) or None
        self.api_key = api_key.encode() if api_key else None
        self.max_requests, self.in_flight = max_requests_per_replica, 0
        self.max_body_bytes = max_body_bytes
        tags = ("model", "backend")
        self.requests = metrics.Counter("fspo_requests", "Personalize requests by status.", ("status", *tags))
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
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/PersonalizeRequest"}}}}})  # fmt: skip
    async def personalize(self, http: Request):
        started = time.perf_counter()
        if not self._authorized(http.headers.get("authorization")):
            return self._error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               {"WWW-Authenticate": "Bearer"})  # fmt: skip
        if self.in_flight >= self.max_requests:
            return self._error(503, "overloaded: too many requests in flight; retry shortly", {"Retry-After": "1"})
        self.in_flight += 1
        response = None
        try:
            request = PersonalizeRequest.model_validate_json(await self._body(http))
            response = await self._personalize(request, started)
            return response
        except ValidationError as e:
            self.requests.inc(tags={"status": "422", **self.tags})
            return JSONResponse(validation_error_body(e.errors(include_url=False, include_context=False,
                                                               include_input=False)), status_code=422)  # fmt: skip
        except HTTPException as e:
            return self._error(e.status_code, e.detail)
        except Exception as e:
            return JSONResponse(self._fault(e), status_code=500)
        finally:
            if not isinstance(response, AdmittedStream):
                self._release()

    def _authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        # The scheme is case-insensitive (RFC 9110 §11.1); the key is compared in constant time.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

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

    def _error(self, status: int, detail: str, headers: dict | None = None) -> JSONResponse:
        self.requests.inc(tags={"status": str(status), **self.tags})
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def _fault(self, error: Exception) -> dict:
        """The error body of a request the engine failed on: logged by id and type, never with the
        user's text, and counted."""
        error_id = uuid.uuid4().hex[:16]
        logger.error("request %s failed: %s", error_id, type(error).__name__, exc_info=error)
        self.engine_errors.inc(tags=self.tags)
        self.requests.inc(tags={"status": "500", **self.tags})
        return {"detail": f"the server failed on this request ({type(error).__name__})", "error_id": error_id}

    async def _personalize(self, request: PersonalizeRequest, started: float):
        style = self.style
        self._check_request(request)
        shots = tuple(Shot(s.question.strip(), s.preferred.strip(), s.dispreferred.strip()) for s in request.history)
        # Training's rule (fit_episode): prompt <= max_prompt_length, and room for the answer within max_length.
        budget = min(self.max_prompt_length, self.max_length - request.max_new_tokens)
        # Off the event loop: a long history takes a while to tokenize, and health checks must not wait.
        fitted = await asyncio.to_thread(fit_prompt, shots, request.query.strip(), self.tokenizer, budget,
                                         style=style, user_description=request.user_description)  # fmt: skip
        if fitted is None:  # refused before any prefill: a long query is a client's mistake, not the engine's work
            raise HTTPException(413, f"the query does not fit: this model's prompts hold at most {max(budget, 0)}"
                                     f" tokens (max_prompt_length={self.max_prompt_length}; max_length="
                                     f"{self.max_length} minus max_new_tokens={request.max_new_tokens})")  # fmt: skip
        prompt, dropped = fitted
        sampling = Sampling(request.max_new_tokens, request.temperature, request.top_p, request.seed)
        meta = {"prompt_tokens": len(prompt), "shots_used": len(shots) - dropped, "shots_dropped": dropped}
        # The prompt's first shot starts the part of it that is this user's: requests that share it share
        # cached KV blocks, on the replica the router keeps them on. A digest: the key travels with the call.
        user = request.user_id or (repr(shots[dropped]) if dropped < len(shots) else None)
        key = hashlib.blake2b(user.encode(), digest_size=16).hexdigest() if user else None
        if request.stream:
            events = self._events(prompt, sampling, key, request, style, meta, started)
            return AdmittedStream(events, self._release)
        generation, replica = await self.generator.generate.remote(prompt, sampling, affinity_key=key)
        meta["cached_prompt_tokens"] = generation.cached_prompt_tokens
        return self._response(generation.text, generation.completion_tokens, replica, request, style, meta, started)

    def _check_request(self, request: PersonalizeRequest) -> None:
        """The prompt is always the one the model was trained on: a request that asks for another is a 422
        naming the field, not a prompt the model never saw; so is one that asks for more tokens than this
        server generates (its limit is also the most a request gets by default)."""
        mode, wrong = self.style.description_mode, None
        if "max_new_tokens" not in request.model_fields_set:  # the default, within this server's limit
            request.max_new_tokens = min(request.max_new_tokens, self.max_new_tokens_limit)
        if request.max_new_tokens > self.max_new_tokens_limit:
            wrong = ("max_new_tokens", f"at most {self.max_new_tokens_limit} on this server")
        elif mode == "teacher_forced" and not request.user_description:
            wrong = ("user_description", "required: this model was trained with the user's description given")
        elif mode != "teacher_forced" and request.user_description:
            wrong = ("user_description", f"this model was trained with description_mode={mode}: it takes none")
        elif request.rationalize and mode != "generated":
            wrong = ("rationalize", f"this model was trained with description_mode={mode}: it writes no description")
        if wrong:
            raise ValidationError.from_exception_data(
                "PersonalizeRequest", [{"type": "value_error", "loc": (wrong[0],), "input": None,
                                        "ctx": {"error": ValueError(wrong[1])}}])  # fmt: skip

    def _response(self, text: str, completion_tokens: int, replica: str, request: PersonalizeRequest,
                  style: PromptStyle, meta: dict, started: float) -> PersonalizeResponse:  # fmt: skip
        """The finished answer, streamed or not: its header stripped, its request counted."""
        self.requests.inc(tags={"status": "200", **self.tags})
        self.latency.observe(time.perf_counter() - started, tags=self.tags)
        self.tokens.inc(completion_tokens, tags=self.tags)
        description, answer = strip_completion_header(text, preferred_only=style.preferred_only)
        return PersonalizeResponse(
            response=answer,
            user_description=description if style.description_mode == "generated" else request.user_description,
            model=self.model_name,
            replica=replica,
            usage=Usage(prompt_tokens=meta["prompt_tokens"], completion_tokens=completion_tokens,
                        cached_prompt_tokens=meta.get("cached_prompt_tokens")),
            shots_used=meta["shots_used"],
            shots_dropped=meta["shots_dropped"],
        )

    async def _events(self, prompt, sampling, key, request, style, meta, started):
        """Server-sent events: {"token": ...} for each piece of the answer, then the full response; an
        {"error": ...} event instead if the engine fails or stalls midway."""
        text, shown, replica, first = "", 0, None, True
        pieces = self.generator.options(stream=True).stream.remote(prompt, sampling, affinity_key=key)
        try:
            async for piece in pieces:
                if replica is None:  # the engine's first item names its replica
                    replica = piece
                    continue
                if first:
                    first = False
                    self.first_token.observe(time.perf_counter() - started, tags=self.tags)
                text += piece
                body_start = answer_start(text, preferred_only=style.preferred_only)
                if body_start is None:
                    continue  # still inside the description or the header
                shown = max(shown, body_start)
                if len(text) > shown:
                    yield f"data: {json.dumps({'token': text[shown:]})}\n\n"
                    shown = len(text)
        except Exception as e:
            yield f"data: {json.dumps({'error': self._fault(e)})}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            pieces.cancel()  # the client left (or the stream ended): the engine stops generating
        completion_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        final = self._response(text, completion_tokens, replica, request, style, meta, started)
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
