"""OpenAI's chat-completions bodies, as far as this service speaks them, and its errors' shape.

A request's last user message is the query (earlier messages are not part of an FSPO prompt and are
not used); personalization comes from `user` (that user's stored history) and/or `preferences` (pairs
in the body, after the stored ones: the newest). OpenAI clients send the extra fields with `extra_body`.
Errors are `{"error": {"message", "type", "param", "code"}}`, as OpenAI's clients parse them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fspo_ray.serve.api import (
    MAX_HISTORY,
    MAX_TEXT_CHARS,
    NO_NUL,
    USER_ID_PATTERN,
    NewTokens,
    PreferenceExample,
    Seed,
    Temperature,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 503: "overloaded_error", 500: "server_error"}  # fmt: skip


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS, pattern=NO_NUL)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS, pattern=NO_NUL)] | list[TextPart] = Field(
        max_length=MAX_TEXT_CHARS)
    name: str | None = Field(default=None, max_length=64)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=MAX_HISTORY, json_schema_extra={
        "contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}})
    user: str | None = Field(default=None, pattern=USER_ID_PATTERN, description=(
        "the user whose stored preference history personalizes the answer (POST /v1/users/{user_id}/preferences)"))
    preferences: list[PreferenceExample] = Field(default_factory=list, max_length=MAX_HISTORY, description=(
        "more of the user's preferences, after the stored ones (an OpenAI client sends them with extra_body)"))
    user_description: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS, pattern=NO_NUL)
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    temperature: Temperature = 0.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("messages")
    @classmethod
    def _has_a_question(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("no user message: the last one is the question")
        return messages

    @property
    def query(self) -> str:
        return next(m.text for m in reversed(self.messages) if m.role == "user")

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}  # fmt: skip


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def completion(request_id: str, model: str, text: str, finish_reason: str, usage: dict, extra: dict) -> dict:
    """A whole answer as OpenAI's `chat.completion`; `extra` (fspo: shots used and dropped, replica)
    rides beside its fields, which OpenAI's clients keep as extra attributes."""
    return {"id": completion_id(request_id), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage, "fspo": extra}  # fmt: skip


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None,
          usage: dict | None = None, choices: bool = True) -> dict:  # fmt: skip
    """One `chat.completion.chunk`; the usage chunk (stream_options.include_usage) has no choices."""
    return {"id": completion_id(request_id), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if choices else [], **({"usage": usage} if usage is not None else {})}  # fmt: skip
