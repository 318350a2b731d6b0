"""Stored preference histories, feedback and the playground page, on the personalization ingress (a mixin
of the Personalizer, serve/app.py). The store is fspo_ray/serve/store.py: SQLite or PostgreSQL.

The ordinary key may append pairs and give feedback (and personalize from what is stored); reading a
user's pairs back and forgetting a user need the admin key, so a client holding the ordinary key cannot
read anyone's history.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from fastapi import Path, Query, Request
from fastapi.responses import FileResponse, Response

import fspo_ray.serve
from fspo_ray.serve.api import (
    USER_ID_PATTERN,
    AppendRequest,
    AppendResponse,
    DeletedResponse,
    ErrorBody,
    FeedbackRequest,
    FeedbackResponse,
    PairOut,
    PairsPage,
)
from fspo_ray.serve.store import StoredPair
from serve.ingress import ADMIN_ERRORS, ERRORS, api, parsed_body

STATIC = os.path.join(os.path.dirname(fspo_ray.serve.__file__), "static")
PAGES = {"index.html": "text/html", "playground.js": "text/javascript", "playground.css": "text/css"}
USER = Path(pattern=USER_ID_PATTERN, description="letters, digits and ._@:-, at most 128")
WRITE_ERRORS = {**{s: e for s, e in ERRORS.items() if s != 503},
                409: {"model": ErrorBody, "description": "A pair id stored before with other content."},
                413: {"model": ErrorBody, "description": "The body is over the size limit, or the user's history"
                                                         " is full (`max_pairs_per_user`)."}}  # fmt: skip


def content_id(question: str, preferred: str, dispreferred: str) -> str:
    """A pair's id when the client gives none: the same pair sent twice is stored once."""
    return hashlib.blake2b(f"{question}\0{preferred}\0{dispreferred}".encode(), digest_size=12).hexdigest()


class HistoryRoutes:
    @api.post("/v1/users/{user_id}/preferences", response_model=AppendResponse, responses=WRITE_ERRORS,
              openapi_extra=parsed_body(AppendRequest))  # fmt: skip
    async def append_preferences(self, http: Request, user_id: str = USER):
        """Append pairs to the user's stored history (idempotent by pair id)."""

        async def append(request: AppendRequest, _) -> AppendResponse:
            pairs = [StoredPair(p.id or content_id(p.question, p.preferred, p.dispreferred), p.question.strip(),
                                p.preferred.strip(), p.dispreferred.strip()) for p in request.pairs]  # fmt: skip
            added = await asyncio.to_thread(self.store.append, user_id, pairs)
            self.requests.inc(tags={"status": "200", **self.tags})
            return AppendResponse(user_id=user_id, ids=[p.pair_id for p in pairs], added=sum(added))

        return await self._handle(http, AppendRequest, append)

    @api.get("/v1/users/{user_id}/preferences", response_model=PairsPage, responses=ADMIN_ERRORS)
    async def read_preferences(self, http: Request, user_id: str = USER, limit: int = Query(20, ge=1, le=100),
                               before: int | None = Query(None, ge=1, le=2**62)):  # fmt: skip
        """The user's stored pairs, newest first, a page at a time (admin key)."""

        async def read(_, __) -> PairsPage:
            pairs = await asyncio.to_thread(self.store.recent, user_id, limit, before)
            self.requests.inc(tags={"status": "200", **self.tags})
            return PairsPage(user_id=user_id, pairs=[PairOut(id=p.pair_id, question=p.question, preferred=p.preferred,
                                                             dispreferred=p.dispreferred, source=p.source,
                                                             created=p.created) for p in pairs],
                             next_before=pairs[-1].seq if len(pairs) == limit else None)  # fmt: skip

        return await self._handle(http, None, read, admin=True)

    @api.delete("/v1/users/{user_id}", response_model=DeletedResponse, responses=ADMIN_ERRORS)
    async def delete_user(self, http: Request, user_id: str = USER):
        """Forget everything stored about the user: pairs, and answers kept for feedback (admin key)."""

        async def delete(_, __) -> DeletedResponse:
            deleted = await asyncio.to_thread(self.store.delete_user, user_id)
            self.requests.inc(tags={"status": "200", **self.tags})
            return DeletedResponse(user_id=user_id, pairs_deleted=deleted)

        return await self._handle(http, None, delete, admin=True)

    @api.post("/v1/feedback", response_model=FeedbackResponse,
              responses={**WRITE_ERRORS, 404: {"model": ErrorBody, "description": "No such answer for this user."}},
              openapi_extra=parsed_body(FeedbackRequest))  # fmt: skip
    async def feedback(self, http: Request):
        """Which of two answers the user preferred, stored as a new pair of their history (source "feedback"):
        the training data `python -m jobs.export_preferences` writes out."""

        async def record(request: FeedbackRequest, _) -> FeedbackResponse:
            if request.answers:
                (question, preferred), (other, dispreferred) = await asyncio.gather(
                    asyncio.to_thread(self.store.answer, request.user_id, request.answers.preferred),
                    asyncio.to_thread(self.store.answer, request.user_id, request.answers.dispreferred))
                if question != other:
                    return self._error(422, "the two answers were to different questions")
            else:
                question, preferred, dispreferred = (request.pair.question, request.pair.preferred,
                                                     request.pair.dispreferred)
            question, preferred, dispreferred = question.strip(), preferred.strip(), dispreferred.strip()
            pair = StoredPair(request.id or content_id(question, preferred, dispreferred), question, preferred,
                              dispreferred, source="feedback")  # fmt: skip
            (added,) = await asyncio.to_thread(self.store.append, request.user_id, [pair])
            self.requests.inc(tags={"status": "200", **self.tags})
            return FeedbackResponse(user_id=request.user_id, id=pair.pair_id, added=added)

        return await self._handle(http, FeedbackRequest, record)

    @api.get("/", include_in_schema=False)
    async def playground(self):
        """The playground page: static files shipped in the package, no build step, nothing from a CDN."""
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        if name not in PAGES:
            return Response(status_code=404)
        return FileResponse(os.path.join(STATIC, name), media_type=PAGES[name])
