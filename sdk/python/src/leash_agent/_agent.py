"""An agent and its tasks: the token exchange (RFC 8693 with private_key_jwt), DPoP proofs,
renewal by re-exchange, and waiting for a human's approval.

What happens around one request is written once, as a generator (`Task._flow`) that yields
what it needs done: send the request, sleep, or make a blocking call to Leash. The httpx sync and
async auths and the `requests` auth only carry those steps out their own way, so the three
cannot drift apart.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from ._errors import ApprovalDenied, ApprovalTimeout, LeashError, TaskEnded
from ._jose import InvalidKey, SigningKey, unverified_claims

if TYPE_CHECKING:
    import requests.auth

    from ._auth import LeashAuth

log = logging.getLogger("leash_agent")

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 (a URN)
GRANT_TOKEN_TYPE = "urn:leash:params:oauth:token-type:grant"  # noqa: S105 (a URN)
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PROXY_CREDENTIAL_TYPE = "urn:leash:params:oauth:token-type:proxy-credential"

#: The header on every answer Leash itself produces (API §6); the gateway strips it from
#: upstream answers, so only Leash's own refusals carry it.
DECISION_HEADER = "Leash-Decision"

#: A token is exchanged again this long before it expires, or a quarter of its lifetime if that
#: is shorter: soon enough that a request signed with it still arrives while it is valid.
RENEW_AHEAD_SECONDS = 30.0

#: Polling an approval's status: first after this long, then backing off to at most the max.
APPROVAL_POLL_FIRST = 0.5
APPROVAL_POLL_MAX = 5.0

#: Leash's description of a token refused for a `single_use` action it already used (API §2).
SINGLE_USE_SPENT = "single-use action already used"

#: A `429` from the token endpoint is waited out when it asks for at most this long.
RATE_LIMIT_WAIT_MAX = 10.0


@dataclass(frozen=True)
class PendingApproval:
    """A request waiting for the human's decision, as Leash describes it: what the app can show
    ("waiting for approval of mail:send POST /gw/mail/messages/1/send")."""

    id: str
    status_url: str
    action: str | None
    method: str | None
    path: str | None


class _Token:
    """An access token and when to replace it. Its `repr` shows no part of the token."""

    __slots__ = ("grant_id", "renew_at", "scope", "value")

    def __init__(self, value: str, grant_id: str, scope: list[str], renew_at: float) -> None:
        self.value = value
        self.grant_id = grant_id
        self.scope = scope
        self.renew_at = renew_at

    def __repr__(self) -> str:
        return f"_Token(grant_id={self.grant_id!r}, scope={self.scope!r})"


@dataclass(frozen=True)
class _ExchangeAnswer:
    """What one token request came to: a token, or Leash's refusal."""

    status: int
    code: str = ""
    description: str = ""
    nonce: str | None = None
    retry_after: float | None = None
    token: _Token | None = None


class HeaderSetter:
    """Sets a request's headers for `Task._flow`; its `repr` shows none of them (a traceback's
    locals would otherwise print the proof)."""

    __slots__ = ("_set",)

    def __init__(self, set_header: Callable[[str, str], None]) -> None:
        self._set = set_header

    def __call__(self, name: str, value: str) -> None:
        self._set(name, value)

    def __repr__(self) -> str:
        return "HeaderSetter(<request headers>)"


# The steps `Task._flow` asks its driver for.
class _Send:
    """Send the request as it now stands; the driver answers with an `_Answer`."""


SEND = _Send()


@dataclass(frozen=True)
class _Sleep:
    seconds: float


@dataclass(frozen=True)
class _Call:
    """A blocking call to Leash (async drivers run it in a worker thread)."""

    fn: Callable[[], Any]


Step = _Send | _Sleep | _Call


@dataclass(frozen=True)
class _Answer:
    """What the flow needs of a response: Leash's decision, if Leash itself answered."""

    status: int
    decision: str | None
    nonce: str | None
    body: dict[str, Any]

    @classmethod
    def of(cls, status: int, headers: Mapping[str, str], content: bytes) -> _Answer:
        decision = headers.get(DECISION_HEADER)
        if decision is None:
            return cls(status, None, None, {})
        try:
            body = json.loads(content) if content else {}
        except ValueError:
            body = {}
        return cls(
            status,
            decision,
            headers.get("DPoP-Nonce"),
            body if isinstance(body, dict) else {},
        )


def _error_of(response: httpx.Response) -> LeashError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return LeashError(
            body["error"], str(body.get("error_description", "")), response.status_code
        )
    return LeashError(
        "unexpected_response", f"HTTP {response.status_code} from Leash", response.status_code
    )


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """Scheme, host (IDNA-encoded, lower case) and port of `url`, as httpx sends it."""
    parsed = httpx.URL(url) if isinstance(url, str) else url
    scheme = parsed.scheme.lower()
    port = parsed.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, parsed.raw_host.decode("ascii").lower(), port


def _dot_segments(path: str) -> bool:
    """Whether a path, percent-decoded, has `.` or `..` segments (which a front proxy may
    resolve, moving the request out of the issuer's path)."""
    return any(segment in (".", "..") for segment in unquote(path).replace("\\", "/").split("/"))


class Agent:
    """An agent's identity at one Leash server: its id (a SPIFFE-style URI) and private key.

    `repr()` shows the issuer, the id and the key's thumbprint, never the key.
    """

    def __init__(
        self,
        issuer: str,
        agent_id: str,
        key: SigningKey,
        *,
        timeout: float = 10.0,
        verify: ssl.SSLContext | bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`issuer` is Leash's base URL (its `issuer`, e.g. `https://leash.example`); `clock`
        gives the time put in assertions and proofs (Leash accepts ±60 s of skew)."""
        scheme, host, _ = _origin(issuer)
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"the issuer must be an http(s) URL, not {issuer!r}")
        self.issuer = issuer.rstrip("/")
        self.agent_id = agent_id
        self._key = key
        self._clock = clock
        # Tokens go to the issuer only: no redirect is followed with one.
        self._http = httpx.Client(timeout=timeout, verify=verify, follow_redirects=False)

    @classmethod
    def from_jwk_file(cls, issuer: str, agent_id: str, path: str | Path, **options: Any) -> Agent:
        """The agent whose private JWK `leash agent keygen` wrote to `path`."""
        try:
            jwk = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError:
            raise InvalidKey(f"{path} is not a JSON Web Key") from None
        if not isinstance(jwk, dict):
            raise InvalidKey(f"{path} is not a JSON Web Key")
        return cls(issuer, agent_id, SigningKey.from_jwk(jwk), **options)

    def task(
        self,
        handle: str,
        scope: Sequence[str] | None = None,
        *,
        approval_timeout: float = 900.0,
        on_approval: Callable[[PendingApproval], None] | None = None,
    ) -> Task:
        """One delegated task: the grant `handle` (lgh_…) the human gave this agent, narrowed
        to `scope` if given. Nothing is sent until the first request. A request that needs the
        human's approval waits up to `approval_timeout` seconds; `on_approval` is called once
        per approval when the wait starts."""
        if isinstance(scope, str):
            raise TypeError("scope is a list of actions, e.g. ['mail:read']")
        if scope is not None and not scope:
            # Leash reads no scope as the whole grant: an empty narrowing must not widen.
            raise ValueError("scope is empty: name at least one action, or None for the grant's")
        return Task(self, handle, list(scope) if scope else None, approval_timeout, on_approval)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Agent(issuer={self.issuer!r}, agent_id={self.agent_id!r}, "
            f"key={self._key.thumbprint!r})"
        )

    def _now(self) -> int:
        return int(self._clock())


class Task:
    """One delegated task: holds its token (exchanged on first use, again shortly before it
    expires; never a refresh token) and a DPoP key of its own.

    Safe to share between threads and asyncio tasks: of many requests that find the token due,
    one exchanges and the others wait for it. `repr()` shows no token, handle or key.
    """

    def __init__(
        self,
        agent: Agent,
        handle: str,
        scope: list[str] | None,
        approval_timeout: float,
        on_approval: Callable[[PendingApproval], None] | None,
    ) -> None:
        self._agent = agent
        self._handle = handle
        self._scope = scope
        self._approval_timeout = approval_timeout
        self._on_approval = on_approval
        # A DPoP key for this task alone, of the agent key's kind (ES256 where Ed25519 is not
        # allowed).
        self._dpop_key = SigningKey.generate("ES256" if agent._key.alg == "ES256" else "EdDSA")
        self._token_url = f"{agent.issuer}/oauth2/token"
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self._nonce: str | None = None
        self._ended: str | None = None
        self._auth: LeashAuth | None = None

    def __repr__(self) -> str:
        token = self._token
        return (
            f"Task(agent={self._agent.agent_id!r}, "
            f"grant_id={token.grant_id if token else None!r}, "
            f"scope={token.scope if token else self._scope!r}, ended={self._ended is not None})"
        )

    @property
    def auth(self) -> LeashAuth:
        """An `httpx.Auth` for `httpx.Client` and `httpx.AsyncClient`."""
        if self._auth is None:
            from ._auth import LeashAuth

            self._auth = LeashAuth(self)
        return self._auth

    def client(self, **options: Any) -> httpx.Client:
        """An `httpx.Client` with this task's auth that, should it follow redirects
        (`follow_redirects=True`), sends no credential of the task past the issuer."""
        from ._auth import strip_credentials_leaving

        hooks = options.pop("event_hooks", {})
        hooks = {**hooks, "request": [*hooks.get("request", []), strip_credentials_leaving(self)]}
        return httpx.Client(auth=self.auth, event_hooks=hooks, **options)

    def async_client(self, **options: Any) -> httpx.AsyncClient:
        """`client()` for async code."""
        from ._auth import strip_credentials_leaving_async

        hooks = options.pop("event_hooks", {})
        hooks = {
            **hooks,
            "request": [*hooks.get("request", []), strip_credentials_leaving_async(self)],
        }
        return httpx.AsyncClient(auth=self.auth, event_hooks=hooks, **options)

    def requests_auth(self) -> requests.auth.AuthBase:
        """The same for `requests` (which must be installed)."""
        from ._requests import RequestsAuth

        return RequestsAuth(self)

    @property
    def grant_id(self) -> str:
        """The task's grant (exchanges a token first if none is held yet)."""
        return self._usable_token().grant_id

    @property
    def scope(self) -> list[str]:
        """The actions the current token carries (exchanges one first if none is held)."""
        return list(self._usable_token().scope)

    def url(self, upstream: str, path: str = "/") -> str:
        """The gateway URL of `path` on `upstream`: `task.url("mail", "/messages/1")`."""
        if not upstream or any(c in upstream for c in "/?#%\\"):
            raise ValueError(f"{upstream!r} is not an upstream name")
        return f"{self._agent.issuer}/gw/{upstream}{path if path.startswith('/') else '/' + path}"

    def proxy_credential(self) -> str:
        """A proxy credential (`lpx_…`, API §16) for the task's browser: the password, with the
        user name `leash`, of the browser's proxy settings (Leash's forward proxy). It lives as
        long as an access token and dies with the task; each call exchanges a new one."""
        return self._exchange(proxy=True).value

    def complete(self) -> None:
        """Ends the task at Leash: every token of its grant is dead at once. Again: nothing."""
        if self._ended == "the task is complete":
            return
        url = f"{self._agent.issuer}/v1/grants/{quote(self.grant_id, safe='')}/complete"
        response = self._agent._http.post(url, auth=self.auth)
        if response.status_code != 200:
            raise _error_of(response)
        with self._lock:
            self._ended = "the task is complete"
            self._token = None
        log.info("task of grant %s completed", url.rsplit("/", 2)[-2])

    async def acomplete(self) -> None:
        """`complete()` for async code."""
        import asyncio

        await asyncio.to_thread(self.complete)

    # The token.

    def _fresh_token(self) -> _Token | None:
        """The token if it can still be used (no lock: one reference read)."""
        if self._ended is not None:
            raise TaskEnded(self._ended)
        token = self._token
        if token is not None and time.monotonic() < token.renew_at:
            return token
        return None

    def _usable_token(self) -> _Token:
        return self._fresh_token() or self._renewed_token()

    def _private_token(self) -> _Token:
        """A token for one request, not shared (after a `single_use` action spent the shared
        one's use of it)."""
        if self._ended is not None:
            raise TaskEnded(self._ended)
        return self._exchange()

    def _renewed_token(self, stale: _Token | None = None) -> _Token:
        """A token that is fresh and not `stale`: the one another thread has just got, or a new
        exchange. Single flight: exchanges happen under the lock."""
        with self._lock:
            if self._ended is not None:
                raise TaskEnded(self._ended)
            current = self._token
            if current is not None and current is not stale and time.monotonic() < current.renew_at:
                return current
            self._token = self._exchange()
            return self._token

    def _exchange(self, proxy: bool = False) -> _Token:
        nonce_tried = False
        for _ in range(4):
            answer = self._exchange_once(proxy)
            if answer.token is not None:
                return answer.token
            if answer.code == "use_dpop_nonce" and answer.nonce and not nonce_tried:
                nonce_tried = True
                self._nonce = answer.nonce
                continue
            wait = answer.retry_after
            if answer.status == 429 and wait is not None and 0 <= wait <= RATE_LIMIT_WAIT_MAX:
                log.info("token endpoint rate-limited; retrying in %.1f s", wait)
                time.sleep(wait)
                continue
            if answer.code == "invalid_grant":
                self._ended = answer.description or "the task has ended"
                self._token = None
                raise TaskEnded(self._ended, answer.status)
            raise LeashError(answer.code, answer.description, answer.status)
        raise LeashError("rate_limited", "the token endpoint kept refusing", 429)

    def _exchange_once(self, proxy: bool = False) -> _ExchangeAnswer:
        """One request to the token endpoint. The form (with the grant handle and the client
        assertion) and the proof live in this frame only, which has ended before the caller
        raises anything: an error tracker that records a traceback's locals never sees them.
        A network error is raised again without the frames (httpx's too) that held them."""
        agent = self._agent
        now = agent._now()
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": self._handle,
            "subject_token_type": GRANT_TOKEN_TYPE,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": agent._key.client_assertion(agent.agent_id, agent.issuer, now),
        }
        if self._scope:
            form["scope"] = " ".join(self._scope)
        if proxy:
            form["requested_token_type"] = PROXY_CREDENTIAL_TYPE
        proof = self._dpop_key.dpop_proof("POST", self._token_url, now, nonce=self._nonce)
        started = time.monotonic()
        failure: httpx.HTTPError | None = None
        try:
            response = agent._http.post(self._token_url, data=form, headers={"DPoP": proof})
        except httpx.HTTPError as unreachable:
            failure = unreachable
        del form, proof
        if failure is not None:
            raise failure.with_traceback(None) from None
        if response.status_code == 200:
            try:
                read = self._proxy_credential_of if proxy else self._token_of
                return _ExchangeAnswer(200, token=read(response, started))
            except LeashError as malformed:
                return _ExchangeAnswer(200, malformed.code, malformed.description)
        error = _error_of(response)
        return _ExchangeAnswer(
            response.status_code,
            error.code,
            error.description,
            response.headers.get("DPoP-Nonce"),
            _retry_after(response),
        )

    def _token_of(self, response: httpx.Response, started: float) -> _Token:
        try:
            body = response.json()
            value = body["access_token"]
            lifetime = float(body["expires_in"])
            claims = unverified_claims(value)
        except (ValueError, KeyError, TypeError):
            raise LeashError("unexpected_response", "the token answer is malformed") from None
        grant_id = claims.get("grant_id")
        if str(body.get("token_type", "")).lower() != "dpop" or not isinstance(grant_id, str):
            raise LeashError("unexpected_response", "the token answer is not a DPoP grant token")
        scope = str(body.get("scope", "")).split()
        renew_at = started + lifetime - min(RENEW_AHEAD_SECONDS, lifetime / 4)
        log.debug("exchanged a token for grant %s (scope %s, %d s)", grant_id, scope, lifetime)
        return _Token(value, grant_id, scope, renew_at)

    def _proxy_credential_of(self, response: httpx.Response, started: float) -> _Token:
        try:
            body = response.json()
            value = body["access_token"]
            lifetime = float(body["expires_in"])
        except (ValueError, KeyError, TypeError):
            raise LeashError("unexpected_response", "the token answer is malformed") from None
        if body.get("issued_token_type") != PROXY_CREDENTIAL_TYPE or not str(value).startswith(
            "lpx_"
        ):
            raise LeashError("unexpected_response", "the answer is not a proxy credential")
        scope = str(body.get("scope", "")).split()
        return _Token(str(value), "", scope, started + lifetime)

    # One request.

    def _for_issuer(self, url: str) -> bool:
        """Whether `url` is one of the issuer's own: its origin, under its path, without dot
        segments."""
        issuer = self._agent.issuer
        path = urlsplit(url).path
        return (
            _origin(url) == _origin(issuer)
            and path.startswith(urlsplit(issuer).path + "/")
            and not _dot_segments(path)
        )

    def _check_origin(self, url: str) -> None:
        issuer = self._agent.issuer
        if not self._for_issuer(url):
            scheme, host, port = _origin(url)
            raise LeashError(
                "invalid_request",
                f"refusing to send the task's token to {scheme}://{host}:{port}: "
                f"it goes to its issuer {issuer} only",
            )

    def _flow(
        self, method: str, url: str, set_header: Callable[[str, str], None]
    ) -> Generator[Step, Any, None]:
        """Signs the request, sends it, and acts on Leash's own answers only (those carrying
        `Leash-Decision`): a required nonce, a dead token (re-exchanged once), a required
        approval (waited for, then the request is sent again once with it)."""
        self._check_origin(url)
        token = self._fresh_token()
        if token is None:
            token = yield _Call(self._renewed_token)
        nonce_retried = renewed = approved = False
        while True:
            set_header("Authorization", f"DPoP {token.value}")
            set_header(
                "DPoP",
                self._dpop_key.dpop_proof(
                    method, url, self._agent._now(), token.value, self._nonce
                ),
            )
            answer: _Answer = yield SEND
            if answer.decision == "use_dpop_nonce" and answer.nonce and not nonce_retried:
                nonce_retried = True
                self._nonce = answer.nonce
            elif answer.decision == "invalid_token" and not renewed:
                renewed = True
                if SINGLE_USE_SPENT in str(answer.body.get("error_description", "")):
                    # The token is fine but for this action, whose one use it spent: a token
                    # for this request alone, so that parallel uses do not share one again.
                    token = yield _Call(self._private_token)
                else:
                    token = yield _Call(functools.partial(self._renewed_token, token))
            elif answer.decision == "approval_required" and not approved:
                approved = True
                approval_id = yield from self._wait_for_approval(answer.body)
                set_header("Leash-Approval", approval_id)
                token = self._fresh_token() or (yield _Call(self._renewed_token))
            else:
                return

    def _wait_for_approval(self, body: dict[str, Any]) -> Generator[Step, Any, str]:
        approval_id, status_url = body.get("approval_id"), body.get("status_url")
        if not isinstance(approval_id, str) or not isinstance(status_url, str):
            raise LeashError("approval_required", str(body.get("error_description", "")), 403)
        # Leash names it relative to its issuer (API §7), which may have a path of its own.
        url = self._agent.issuer + status_url if status_url.startswith("/") else status_url
        self._check_origin(url)
        deadline = time.monotonic() + self._approval_timeout
        delay = APPROVAL_POLL_FIRST
        announced = False
        while True:
            status: dict[str, Any] = yield _Call(functools.partial(self._approval_status, url))
            if not announced:
                announced = True
                log.info("waiting for the human to decide on approval %s", approval_id)
                if self._on_approval is not None:
                    self._on_approval(
                        PendingApproval(
                            approval_id,
                            url,
                            status.get("action"),
                            status.get("method"),
                            status.get("path"),
                        )
                    )
            decision = status.get("status")
            if decision == "approved":
                return approval_id
            if decision == "denied":
                raise ApprovalDenied(approval_id)
            if decision == "expired":
                raise ApprovalTimeout(approval_id, f"approval {approval_id} expired undecided")
            if decision != "pending":
                raise LeashError("approval_mismatch", f"approval {approval_id} is {decision}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApprovalTimeout(
                    approval_id,
                    f"no decision on approval {approval_id} within {self._approval_timeout:g} s",
                )
            yield _Sleep(min(delay, left))
            delay = min(delay * 1.6, APPROVAL_POLL_MAX)

    def _approval_status(self, url: str) -> dict[str, Any]:
        response = self._agent._http.get(url, auth=self.auth)
        if response.status_code != 200:
            raise _error_of(response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise LeashError("unexpected_response", "the approval is not an object")
        return body


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
