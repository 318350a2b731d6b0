"""The personalization API's request, response and error bodies, validated by pydantic.

Limits keep one request from holding a replica hostage: a body outside them is answered 422, naming
the field. A history longer than the run's prompt budget is not an error: its oldest shots are dropped
whole (reported in `shots_dropped`), exactly as training drops them. Error bodies never echo what was
sent: a client's 50 MB mistake gets a few hundred bytes back.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from fspo_ray.serve.store import USER_ID

MAX_HISTORY = 64
MAX_TEXT_CHARS = 8_000
MAX_NEW_TOKENS = 1_024
MIN_TEMPERATURE = 1e-3  # below it sampling overflows in fp32 (transformers) or is greedy anyway (vLLM)
MAX_ERROR_BYTES = 4_096
MAX_ERROR_TEXT = 160
NO_NUL = r"^[^\x00]*$"  # a NUL character is no text (and PostgreSQL cannot store one)


def _integral(value: Any) -> Any:
    """JSON Schema counts 4.0 as an integer; strict pydantic would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _greedy_or_samplable(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return value


WholeNumber = Annotated[int, BeforeValidator(_integral)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description=f"0: greedy; else ≥ {MIN_TEMPERATURE:g}",
                                     json_schema_extra={"anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE}]}),
                        AfterValidator(_greedy_or_samplable)]  # fmt: skip
Seed = Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(_integral)]
NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS), BeforeValidator(_integral)]  # (OpenAI's max_tokens)
USER_ID_PATTERN = f"^{USER_ID.pattern}$"  # also a pair's id: letters, digits and ._@:-, at most 128


class PreferenceExample(BaseModel):
    """One labelled preference of the user: the question, the answer they preferred, the one they did not."""

    model_config = ConfigDict(extra="forbid", strict=True)
    question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NO_NUL)
    preferred: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NO_NUL)
    dispreferred: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NO_NUL)


class PersonalizeRequest(BaseModel):
    # Strict: "0" is not a seed nor "true" a flag, as the schema says. NaN and ±Infinity are not numbers
    # a client means; pydantic's JSON parser already refuses lone surrogates, so every string that gets
    # through can be tokenized.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    history: list[PreferenceExample] = Field(default_factory=list, max_length=MAX_HISTORY)
    query: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NO_NUL)
    user_description: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS, pattern=NO_NUL)
    user_id: str | None = Field(default=None, pattern=USER_ID_PATTERN, description=(
        "the user: their stored pairs (POST /v1/users/{user_id}/preferences) come before `history`, and their"
        " requests stay on one engine replica, where their history is cached; without it, requests whose"
        " prompts start with the same shot are kept together"))
    # Models trained with description_mode=generated write a description of the user, then the answer
    # (always; `rationalize` may say so); teacher_forced ones need `user_description`; others take neither.
    rationalize: bool = False
    max_new_tokens: WholeNumber = Field(default=256, ge=1, le=MAX_NEW_TOKENS)
    temperature: Temperature = 0.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int | None = Field(description=(
        "prompt tokens the engine found in its prefix cache (a user's history, on the replica that served them"
        " before); 0 on the transformers engine, which caches nothing; null for a stream"))


class PersonalizeResponse(BaseModel):
    response: str
    user_description: str | None
    model: str
    replica: str = Field(description="the engine replica that wrote the answer")
    usage: Usage
    shots_used: int
    shots_dropped: int


class ErrorBody(BaseModel):
    detail: str
    error_id: str | None = Field(default=None, description="for a server error: find it in the replica's log")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[FieldError]
    errors_not_shown: int = 0


def _short(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validation_error_body(errors: list[dict[str, Any]], where: tuple[str, ...] = ("body",)) -> dict:
    """pydantic's errors as a 422 body of at most MAX_ERROR_BYTES: where and what, never the input (it
    may be huge, or not encodable as JSON at all). `where` goes before each error's `loc` (FastAPI's own
    errors, for path and query parameters, say it themselves)."""
    shown = [
        {"loc": [*where, *(x if isinstance(x, int) else _short(str(x), 40) for x in e["loc"][:6])],
         "msg": _short(e["msg"]), "type": _short(e["type"], 40)}
        for e in errors[:10]
    ]  # fmt: skip
    while shown and len(json.dumps({"detail": shown, "errors_not_shown": 99}).encode()) > MAX_ERROR_BYTES:
        shown.pop()
    return {"detail": shown, "errors_not_shown": len(errors) - len(shown)}


# -- stored histories and feedback --

PairId = Annotated[str, Field(pattern=USER_ID_PATTERN)]


class PairIn(PreferenceExample):
    id: PairId | None = Field(default=None, description=(
        "the client's id for the pair: the same id again with the same content stores nothing (a safe retry), with"
        " other content is a 409; without it the id is a digest of the content, so a retry is safe too"))


class AppendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    pairs: list[PairIn] = Field(min_length=1, max_length=MAX_HISTORY)


class AppendResponse(BaseModel):
    user_id: str
    ids: list[str] = Field(description="each pair's id, in the order sent")
    added: int = Field(description="pairs stored now; the others were stored before, by these ids")


class PairOut(BaseModel):
    id: str
    question: str
    preferred: str
    dispreferred: str
    source: str = Field(description='"api" (appended) or "feedback"')
    created: float = Field(description="when it was stored, in seconds since the epoch")


class PairsPage(BaseModel):
    user_id: str
    pairs: list[PairOut] = Field(description="newest first")
    next_before: int | None = Field(description="pass as `before` for the next page; null on the last")


class DeletedResponse(BaseModel):
    user_id: str
    pairs_deleted: int


class AnswerIds(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    preferred: PairId
    dispreferred: PairId


class FeedbackRequest(BaseModel):
    """Which of two answers the user preferred, stored as a new pair of their history: the texts (`pair`),
    or the ids of two answers the service returned to this user (`answers`: `chat.completion` ids)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["pair"]}, {"required": ["answers"]}]})  # fmt: skip
    user_id: str = Field(pattern=USER_ID_PATTERN)
    # Either one, not null: absent is None (its default), but a client's explicit null is a 422.
    pair: PreferenceExample = None  # type: ignore[assignment]
    answers: AnswerIds = None  # type: ignore[assignment]
    id: PairId | None = Field(default=None, description="the pair's id, as in POST /v1/users/{user_id}/preferences")

    @model_validator(mode="after")
    def _pair_or_answers(self) -> FeedbackRequest:
        if (self.pair is None) == (self.answers is None):
            raise ValueError("give either pair (the texts) or answers (the ids of two answers), not both")
        return self


class FeedbackResponse(BaseModel):
    user_id: str
    id: str
    added: bool = Field(description="false: this pair was stored before (a retry)")
