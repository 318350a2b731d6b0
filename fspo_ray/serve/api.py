"""The personalization API's request and response bodies, validated by pydantic.

Limits keep one request from holding a replica hostage: a body outside them is answered 422, naming
the field. A history longer than the model's context is not an error: its oldest shots are dropped
whole (reported in `shots_dropped`), exactly as training drops them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_HISTORY = 64
MAX_TEXT_CHARS = 8_000
MAX_NEW_TOKENS = 1_024


class PreferenceExample(BaseModel):
    """One labelled preference of the user: the question, the answer they preferred, the one they did not."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    preferred: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    dispreferred: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class PersonalizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[PreferenceExample] = Field(default_factory=list, max_length=MAX_HISTORY)
    query: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    user_description: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    rationalize: bool = False  # the model first writes a description of the user, then the answer
    max_new_tokens: int = Field(default=256, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class PersonalizeResponse(BaseModel):
    response: str
    user_description: str | None
    model: str
    usage: Usage
    shots_used: int
    shots_dropped: int
