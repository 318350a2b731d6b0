"""The ingress's FastAPI app and what every route of it shares: its OpenAPI document, its error answers
and streams that hold an admission slot. The routes are the Personalizer's methods (serve/app.py, with
serve/chat.py's and serve/histories.py's)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from fspo_ray.engines import Sampling
from fspo_ray.serve.api import (
    MAX_NEW_TOKENS,
    AppendRequest,
    ErrorBody,
    FeedbackRequest,
    PersonalizeRequest,
    ValidationErrorBody,
    validation_error_body,
)
from fspo_ray.serve.chat import ChatRequest

# The request bodies our routes parse themselves (after the key and size checks), for the OpenAPI document.
BODIES = {model.__name__: model for model in (PersonalizeRequest, ChatRequest, AppendRequest, FeedbackRequest)}


class PersonalizationAPI(FastAPI):
    max_new_tokens = MAX_NEW_TOKENS  # the served limit (the ingress sets it from its config)
    served_model: str | None = None  # the model's id, the one value chat's `model` may take

    def openapi(self) -> dict:
        """FastAPI documents the bodies it parses itself; our routes parse theirs, after the key and size
        checks, so their schemas join the document here, with the limit this server sets."""
        if self.openapi_schema is None:
            schema = super().openapi()
            for name, model in BODIES.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for field in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
                    if field in body["properties"]:
                        tokens = body["properties"][field]
                        limits = [tokens, *tokens.get("anyOf", [])]  # the optional ones are anyOf [int, null]
                        for limit in (x for x in limits if "maximum" in x):
                            limit["maximum"] = self.max_new_tokens
                        if isinstance(tokens.get("default"), int):
                            tokens["default"] = min(tokens["default"], self.max_new_tokens)
                if name == "ChatRequest" and self.served_model:
                    body["properties"]["model"]["enum"] = [self.served_model]
                schema["components"]["schemas"].update(body.pop("$defs", {}), **{name: body})
        return self.openapi_schema


def parsed_body(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra` for a JSON body it parses itself (one of BODIES)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}  # fmt: skip


api = PersonalizationAPI(
    title="fspo-ray personalization API",
    description="A user's labelled preferences plus a question in, an answer written for that user out; their"
                " preferences stored, and the answers they prefer collected as training data.",
)  # fmt: skip


@api.exception_handler(RequestValidationError)
async def _invalid_parameter(request, error: RequestValidationError) -> JSONResponse:
    """A path or query parameter FastAPI checks: our 422 body, which never echoes the input."""
    return JSONResponse(validation_error_body(list(error.errors()), where=()), status_code=422)


ERRORS = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key (`Authorization: Bearer <key>`)."},
    413: {"model": ErrorBody, "description": "The body is over the size limit, or the query alone does not fit the"
                                             " prompt budget (`detail` names the limits)."},
    422: {"model": ValidationErrorBody, "description": "A field is invalid; `loc` names it."},
    500: {"model": ErrorBody, "description": "The server failed on this request alone; `error_id` is in the log."},
    503: {"model": ErrorBody, "description": "Overloaded: retry after the `Retry-After` header's seconds."},
}  # fmt: skip
ADMIN_ERRORS = {
    **{status: ERRORS[status] for status in (401, 422, 500)},
    403: {"model": ErrorBody, "description": "Needs the admin key (`FSPO_ADMIN_KEY`), not the ordinary one."},
}


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


@dataclass
class Prompt:
    """A request's fitted prompt: its token ids, what it holds, the key that routes it, how to sample."""

    ids: list[int]
    sampling: Sampling
    shots_used: int
    shots_dropped: int
    affinity_key: str | None


@dataclass
class Answer:
    """What a streamed answer has come to so far: the whole generated text, and the replica writing it;
    once it ends, its length in tokens and why it ended (the engine's count, EOS included)."""

    text: str = ""
    replica: str | None = None
    completion_tokens: int = 0
    finish_reason: str = "stop"
