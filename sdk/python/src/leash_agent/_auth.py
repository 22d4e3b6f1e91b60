"""`task.auth`: the httpx driver of `Task._flow`, for `httpx.Client` and `httpx.AsyncClient`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING, Any

import httpx

from ._agent import DECISION_HEADER, _Answer, _Send, _Sleep

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
        flow = self._task._flow(request.method, str(request.url), request.headers.__setitem__)
        result: Any = None
        while True:
            try:
                step = flow.send(result)
            except StopIteration:
                return
            if isinstance(step, _Send):
                response = yield request
                if DECISION_HEADER in response.headers:
                    response.read()
                result = _answer(response)
            elif isinstance(step, _Sleep):
                time.sleep(step.seconds)
                result = None
            else:
                result = step.fn()

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        flow = self._task._flow(request.method, str(request.url), request.headers.__setitem__)
        result: Any = None
        while True:
            try:
                step = flow.send(result)
            except StopIteration:
                return
            if isinstance(step, _Send):
                response = yield request
                if DECISION_HEADER in response.headers:
                    await response.aread()
                result = _answer(response)
            elif isinstance(step, _Sleep):
                await asyncio.sleep(step.seconds)
                result = None
            else:
                # Exchanges are single-flight under a thread lock shared with sync callers;
                # waiting for it in a worker keeps the event loop free.
                result = await asyncio.to_thread(step.fn)


def _answer(response: httpx.Response) -> _Answer:
    content = response.content if DECISION_HEADER in response.headers else b""
    return _Answer.of(response.status_code, response.headers, content)
