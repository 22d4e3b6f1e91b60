"""`task.requests_auth()`: the `requests` driver of `Task._flow`. Imported only when asked for,
so `requests` is not a dependency of the SDK."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import requests
import requests.auth

from ._agent import DECISION_HEADER, Step, _Answer, _Send, _Sleep

if TYPE_CHECKING:
    from ._agent import Task


class RequestsAuth(requests.auth.AuthBase):
    """As `task.auth`, for `requests`: signs the request, and a response hook sends it again
    when Leash asks for a nonce, a new token or an approval."""

    def __init__(self, task: Task) -> None:
        self._task = task

    def __repr__(self) -> str:
        return f"RequestsAuth({self._task!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if request.body is not None and not isinstance(request.body, (bytes, str)):
            raise ValueError(
                "a streamed body cannot be sent again after an approval; pass bytes or str"
            )
        exchange = _Exchange(self._task, request)
        if exchange.advance(None):
            request.register_hook("response", exchange.on_response)  # type: ignore[no-untyped-call]
        return request


class _Exchange:
    """One request's flow, carried across `requests`' response hook."""

    def __init__(self, task: Task, request: requests.PreparedRequest) -> None:
        self._first = request
        self._current = request
        self._redirected = False
        self._flow: Generator[Step, Any, None] = task._flow(
            request.method or "GET", request.url or "", self._set_header
        )

    def _set_header(self, name: str, value: str) -> None:
        self._current.headers[name] = value

    def advance(self, result: Any) -> bool:
        """Runs the flow to its next send (True) or its end (False)."""
        while True:
            try:
                step = self._flow.send(result)
            except StopIteration:
                return False
            if isinstance(step, _Send):
                return True
            if isinstance(step, _Sleep):
                time.sleep(step.seconds)
                result = None
            else:
                result = step.fn()

    def on_response(self, response: requests.Response, **send_options: Any) -> requests.Response:
        if self._redirected or response.request.url != self._first.url:
            # A hop of a redirect (requests runs the request's hooks on every hop): whatever
            # answered there is not Leash answering the request the flow signed.
            return response
        if response.is_redirect:
            self._redirected = True
            # requests follows it with a copy of the request it sent first, dropping only
            # `Authorization` across hosts: the next hop, wherever it goes, gets no credential
            # of the task (a redirect within the issuer needs a proof of its own anyway).
            for sent in (self._first, response.request):
                for name in ("Authorization", "DPoP", "Leash-Approval"):
                    sent.headers.pop(name, None)
            return response
        content = response.content if DECISION_HEADER in response.headers else b""
        answer = _Answer.of(response.status_code, response.headers, content)
        sent = response.request
        # The retry is a copy of what was sent, so that a response's history stays true.
        self._current = sent.copy()
        if not self.advance(answer):
            return response
        response.close()
        retry = response.connection.send(self._current, **send_options)
        retry.history.append(response)
        retry.request = self._current
        return self.on_response(retry, **send_options)
