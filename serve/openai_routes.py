"""OpenAI's `/v1/models` and `/v1/chat/completions` on the personalization ingress (a mixin of the
Personalizer, serve/app.py): the same prompt builder, the run's limits and the engine as /v1/personalize,
in OpenAI's bodies, chunks and errors (fspo_ray/serve/chat.py)."""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import HTTPException, Request

from fspo_ray.data.prompts import strip_completion_header
from fspo_ray.engines import Sampling
from fspo_ray.serve.chat import ChatRequest, chunk, completion, completion_id, error_body
from serve.ingress import AdmittedStream, Answer, api, parsed_body

OPENAI_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}  # fmt: skip
OPENAI_ERRORS = {status: {**OPENAI_ERROR, "description": description} for status, description in {
    400: "Invalid request: `param` names the field.", 401: "Missing or wrong API key.",
    404: "No such model: GET /v1/models lists the one served.", 413: "The body is over the size limit, or the"
    " question does not fit the prompt budget.",
    500: "The server failed on this request alone; `code` is the id in the replica's log.",
    503: "Overloaded: retry after the `Retry-After` header's seconds."}.items()}  # fmt: skip
CHAT_STREAM = {
    "description": "`chat.completion`, or with `\"stream\": true` server-sent events: `chat.completion.chunk`s,"
                   " then `[DONE]`.",
    "content": {"application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}}}},
}  # fmt: skip


class OpenAIRoutes:
    @api.get("/v1/models", responses={401: OPENAI_ERRORS[401]})
    async def models(self, http: Request):
        """The served model, as OpenAI lists models."""
        async def listing(_, __):
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.started,
                                                "owned_by": "fspo-ray"}]}  # fmt: skip

        return await self._handle(http, None, listing, openai=True)

    @api.post("/v1/chat/completions", responses={200: CHAT_STREAM, **OPENAI_ERRORS},
              openapi_extra=parsed_body(ChatRequest))  # fmt: skip
    async def chat_completions(self, http: Request):
        """An answer for the last user message, personalized by `user`'s stored history and `preferences`."""
        return await self._handle(http, ChatRequest, self._chat, generating=True, openai=True)

    async def _chat(self, request: ChatRequest, started: float):
        if request.model != self.model_name:
            raise HTTPException(404, f"the model {request.model[:64]!r} is not served here: this is"
                                     f" {self.model_name!r} (GET /v1/models)")  # fmt: skip
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        tokens = self._check(request.requested_tokens(), request.user_description, tokens_field=field)
        sampling = Sampling(tokens, request.temperature, request.top_p, request.seed)
        prompt = await self._prompt(request.user, request.preferences, request.query, request.user_description,
                                    sampling)  # fmt: skip
        request_id = uuid.uuid4().hex[:24]
        if request.stream:
            return AdmittedStream(self._chat_events(prompt, request, request_id, started), self._release)
        generation, replica = await self._generate(prompt)
        self._count(generation.completion_tokens, started)
        description, text = strip_completion_header(generation.text, preferred_only=self.style.preferred_only)
        await self._remember(request, request_id, text)
        usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": generation.completion_tokens,
                 "total_tokens": len(prompt.ids) + generation.completion_tokens}  # fmt: skip
        return completion(request_id, self.model_name, text, generation.finish_reason, usage,
                          self._extra(prompt, replica, description))  # fmt: skip

    def _extra(self, prompt, replica: str | None, description: str | None) -> dict:
        """What FSPO adds to OpenAI's answer (`fspo`): the shots used and dropped, the engine replica, and
        the user description a description_mode=generated model wrote."""
        return {"shots_used": prompt.shots_used, "shots_dropped": prompt.shots_dropped, "replica": replica,
                "user_description": description}  # fmt: skip

    async def _remember(self, request: ChatRequest, request_id: str, text: str) -> None:
        """A user's answer is kept (by its completion id) so that feedback can name it."""
        if request.user:
            await asyncio.to_thread(self.store.remember_answer, request.user, completion_id(request_id),
                                    request.query.strip(), text)  # fmt: skip

    async def _chat_events(self, prompt, request: ChatRequest, request_id: str, started: float):
        """OpenAI's stream: a chunk with the role, one per piece of the answer, one with the finish reason,
        the usage chunk if `stream_options.include_usage`, then [DONE]; an error event if the engine fails."""
        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        answer = Answer()
        yield event(chunk(request_id, self.model_name, {"role": "assistant", "content": ""}))
        try:
            async for piece in self._answer_pieces(prompt, answer, started):
                yield event(chunk(request_id, self.model_name, {"content": piece}))
        except Exception as e:
            fault = self._fault(e)
            yield event(error_body(500, fault["detail"], code=fault["error_id"]))
            yield "data: [DONE]\n\n"
            return
        self._count(answer.completion_tokens, started)
        description, text = strip_completion_header(answer.text, preferred_only=self.style.preferred_only)
        await self._remember(request, request_id, text)
        final = chunk(request_id, self.model_name, {}, answer.finish_reason)
        yield event({**final, "fspo": self._extra(prompt, answer.replica, description)})
        if request.stream_options and request.stream_options.include_usage:
            usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": answer.completion_tokens,
                     "total_tokens": len(prompt.ids) + answer.completion_tokens}  # fmt: skip
            yield event(chunk(request_id, self.model_name, {}, usage=usage, choices=False))
        yield "data: [DONE]\n\n"
