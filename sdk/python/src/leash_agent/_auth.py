"""`task.auth`: the httpx driver of `Task._flow`, for `httpx.Client` and `httpx.AsyncClient`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import httpx

from ._agent import DECISION_HEADER, HeaderSetter, _Answer, _Send, _Sleep

if TYPE_CHECKING:
    from ._agent import Task


class LeashAuth(httpx.Auth):
    """Signs each request with the task's token and a fresh DPoP proof, and handles Leash's
    answers (nonce, renewal, approval). Only Leash's answers are read whole: a streamed upstream
    answer (an MCP event stream, a download) is handed back unread."""

    # The body is kept so that a retry (nonce, renewal, approval) sends exactly the same one.
    requires_request_body = True

    def __init__(self, task: Task) -> None:
        self._task = task

    def __repr__(self) -> str:
        return f"LeashAuth({self._task!r})"

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        request.read()
        flow = self._task._flow(
            request.method, str(request.url), HeaderSetter(request.headers.__setitem__)
        )
        result: Any = None
        while True:
            try:
                step = flow.send(result)
            except StopIteration:
                return
            if isinstance(step, _Send):
                response = yield request
                if _from_leash(request, response):
                    response.read()
                result = _answer(request, response)
            elif isinstance(step, _Sleep):
                time.sleep(step.seconds)
                result = None
            else:
                result = step.fn()

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        flow = self._task._flow(
            request.method, str(request.url), HeaderSetter(request.headers.__setitem__)
        )
        result: Any = None
        while True:
            try:
                step = flow.send(result)
            except StopIteration:
                return
            if isinstance(step, _Send):
                response = yield request
                if _from_leash(request, response):
                    await response.aread()
                result = _answer(request, response)
            elif isinstance(step, _Sleep):
                await asyncio.sleep(step.seconds)
                result = None
            else:
                # Exchanges are single-flight under a thread lock shared with sync callers;
                # waiting for it in a worker keeps the event loop free.
                result = await asyncio.to_thread(step.fn)


def _from_leash(request: httpx.Request, response: httpx.Response) -> bool:
    """Whether Leash itself answered the request the flow signed: its decision header, on the
    answer to that very request. A client that follows redirects hands the auth the answer at
    the end of the chain, which whoever the upstream redirected to wrote, header and all."""
    return (
        DECISION_HEADER in response.headers
        and not response.history
        and response.request.url == request.url
    )


def _answer(request: httpx.Request, response: httpx.Response) -> _Answer:
    if not _from_leash(request, response):
        return _Answer(response.status_code, None, None, {})
    return _Answer.of(response.status_code, response.headers, response.content)


def strip_credentials_leaving(task: Task) -> Callable[[httpx.Request], None]:
    """A request event hook for an httpx client that follows redirects: a hop that leaves the
    issuer loses the token, the proof and the approval id (httpx itself drops only
    `Authorization`, and only across origins)."""

    def hook(request: httpx.Request) -> None:
        if not task._for_issuer(str(request.url)):
            for name in ("Authorization", "DPoP", "Leash-Approval"):
                request.headers.pop(name, None)

    return hook


def strip_credentials_leaving_async(
    task: Task,
) -> Callable[[httpx.Request], Coroutine[Any, Any, None]]:
    """The same hook for an `httpx.AsyncClient`."""
    strip = strip_credentials_leaving(task)

    async def hook(request: httpx.Request) -> None:
        strip(request)

    return hook
