"""A real OpenID Provider and a real browser for the OIDC login and console tests, on loopback:

- `make_idp(redirect_uris=(), audience=None, accounts=None, ...)` (fixture, a factory) and `idp`
  (fixture, one per test module): tests/idp/idp.mjs, npm `oidc-provider` unmodified, with a
  confidential client for Leash (a fresh secret each time), a second client of the harness's
  own, and the test accounts `ACCOUNTS`. The relying party's redirect URI is usually known only
  after it starts, and it needs the issuer to start: give it then with `Idp.set_redirect_uri`;
- `login_over_http(http, authorize_url, username, password)`: a person's login at that IdP over
  plain HTTP, up to the redirect back to the relying party, which it does not follow;
- `Idp.access_token(username, audience)` and `Idp.id_token(username)`: real tokens from the IdP's
  real flows (authorization code with PKCE);
- the IdP as an upstream's OAuth server (`make_idp(refresh_tokens=True, access_token_ttl=...,
  scopes=["mail.read"])`): `Idp.tokens(username, scope=...)` gives an opaque access token and a
  refresh token; `Idp.refresh`, `Idp.revoke` (RFC 7009) and `Idp.introspect` (RFC 7662, as the
  resource server's client `RESOURCE_SERVER_CLIENT_ID`, which every IdP has); every refresh
  rotates the refresh token, and presenting a rotated-away one fails `invalid_grant` and revokes
  the whole grant. `Idp.stats()` counts the token endpoint's grants and failed refreshes and the
  revocations, `Idp.revoke_refresh_tokens(username)` revokes a person's grants behind the client's
  back, and `Idp.fail_token_endpoint(status, count)` makes the next token requests fail. A
  resource server that checks bearer tokens by introspection is tests/upstream_api.py;
- `browser` (fixture, one per test module) and `browser_page` (fixture, a fresh context per test):
  Playwright driving Debian's chromium (`LEASH_CHROMIUM`, default /usr/bin/chromium).

The IdP's login page is a form `#login` with the fields `username` and `password` and a submit
button `#submit`; a wrong password answers 401 with the form again and `#error`. Every
authorization request shows it (no single sign-on), unless the IdP was made with `sso=True`.
Its cookies are named `idp_*`. Node.js is required: without `node` these fixtures fail."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx
import pytest
from mcp_fixtures import stop
from playwright.sync_api import Browser, Page, sync_playwright

TESTS = Path(__file__).resolve().parent
IDP_DIR = TESTS / "idp"
CHROMIUM = os.environ.get("LEASH_CHROMIUM", "/usr/bin/chromium")
# Leash's client at the IdP, and the harness's own (for `access_token`).
LEASH_CLIENT_ID = "leash"
HARNESS_CLIENT_ID = "test-harness"
# The client of the upstream's resource server (tests/upstream_api.py): no grants, and it may
# introspect every token (other clients only their own).
RESOURCE_SERVER_CLIENT_ID = "resource-server"
# The default audience of the `idp` fixture's access tokens (Leash's `[oidc] audience` in tests).
DEFAULT_AUDIENCE = "https://leash.test/api"


@dataclass(frozen=True)
class Account:
    """A person at the IdP. `sub` is what the relying party must key them by; the user name is
    their `preferred_username`."""

    password: str
    sub: str
    email: str
    groups: tuple[str, ...] = ()
    name: str | None = None


# The test accounts every IdP has (`make_idp(accounts=...)` adds or replaces some).
ACCOUNTS: dict[str, Account] = {
    "alice": Account("alice-password", "sub-alice", "alice@example.com", ("staff",)),
    "bob": Account("bob-password", "sub-bob", "bob@example.com", ("staff",)),
    "root": Account("root-password", "sub-root", "root@example.com", ("leash-admins",)),
    "mallory": Account("mallory-password", "sub-mallory", "mallory@example.com"),
}


def node() -> str:
    """The `node` executable, with the IdP's packages installed (tests/idp/install.sh). Fails,
    never skips, where there is none."""
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is required for the OIDC tests (Node.js 18.12 or later, with npm)")
    subprocess.run(["bash", str(IDP_DIR / "install.sh")], check=True)
    return path


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Pkce:
    """A PKCE verifier and its S256 challenge."""

    verifier: str = field(default_factory=lambda: secrets.token_urlsafe(48))

    @property
    def challenge(self) -> str:
        return b64url(hashlib.sha256(self.verifier.encode()).digest())


@dataclass(frozen=True)
class Authorization:
    """An authorization request as a relying party makes it: its URL and what it keeps."""

    url: str
    redirect_uri: str
    state: str
    nonce: str | None
    pkce: Pkce


def login_over_http(
    http: httpx.Client, authorize_url: str, username: str, password: str
) -> httpx.Response:
    """Logs `username` in at the IdP from `authorize_url` (an authorization request, e.g. where a
    relying party's `/login` redirects to): follows the IdP's redirects, fills its login form,
    and returns the IdP's redirect back to the request's `redirect_uri` (with `code`, `state` and
    `iss`, or an `error`) without following it. `http` keeps the IdP's cookies; its other
    settings (a `base_url`, following redirects) do not matter."""
    redirect_uri = parse_qs(urlsplit(authorize_url).query).get("redirect_uri", [""])[0]
    if not redirect_uri:
        raise ValueError(f"not an authorization request (no redirect_uri): {authorize_url}")
    response = http.get(authorize_url, follow_redirects=False)
    for _ in range(10):
        if response.is_redirect:
            location = urljoin(str(response.url), response.headers["location"])
            if location.split("?", 1)[0] == redirect_uri:
                return response
            response = http.get(location, follow_redirects=False)
        elif response.status_code == 200 and 'id="login"' in response.text:
            action = re.search(r'<form id="login" method="post" action="([^"]+)"', response.text)
            assert action is not None, response.text
            response = http.post(
                urljoin(str(response.url), html.unescape(action.group(1))),
                data={"username": username, "password": password},
                follow_redirects=False,
            )
            if response.status_code == 401:
                raise AssertionError(f"the IdP refused the login of {username!r}")
        elif response.status_code == 200 and (form := auto_submit_form(response.text)):
            # A page that a browser's script submits at once: oidc-provider's logout of the
            # IdP session of another account before a new login. (A form_post response to the
            # relying party is returned, not submitted.)
            target = urljoin(str(response.url), form[0])
            if target == redirect_uri:
                return response
            response = http.post(target, data=form[1], follow_redirects=False)
        else:
            raise AssertionError(
                f"unexpected answer from {response.url}: {response.status_code}\n{response.text}"
            )
    raise AssertionError("the IdP did not redirect back after 10 steps")


def auto_submit_form(page: str) -> tuple[str, dict[str, str]] | None:
    """The action and hidden fields of a page's form that its script submits on load."""
    form = re.search(r'<form method="post" action="([^"]+)">(.*?)</form>', page, re.DOTALL)
    if form is None or "document.forms[0].submit()" not in page:
        return None
    fields = {}
    for tag in re.findall(r"<input [^>]*>", form.group(2)):
        name, value = re.search(r'name="([^"]*)"', tag), re.search(r'value="([^"]*)"', tag)
        if name is not None:
            fields[html.unescape(name.group(1))] = html.unescape(value.group(1) if value else "")
    return html.unescape(form.group(1)), fields


def redirect_query(response: httpx.Response) -> dict[str, str]:
    """The query parameters of a redirect (e.g. `code`, `state`, `iss`)."""
    query = parse_qs(urlsplit(response.headers["location"]).query)
    return {name: values[0] for name, values in query.items()}


class IdpProcess:
    """idp.mjs running: its output (stdout and stderr together) is read as it comes and echoed
    to stderr (pytest shows it with a failing test); commands go in on its stdin, one at a time
    (from any thread)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.output: list[str] = []
        self.lines: queue.Queue[str] = queue.Queue()
        self.commanding = threading.Lock()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "IDP_CONFIG": json.dumps(config),
            "NODE_ENV": "test",
        }
        self.process = subprocess.Popen(
            [node(), "idp.mjs"],
            cwd=IDP_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self.read, daemon=True).start()
        try:
            self.issuer = self.answer("IDP READY ", 30)
        except AssertionError:
            self.stop()
            raise

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            sys.stderr.write(f"idp: {line}")
            if line.startswith("IDP "):
                self.lines.put(line.rstrip("\n"))

    def answer(self, prefix: str, timeout: float = 10) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the IdP did not answer:\n" + "".join(self.output)) from None
        if not line.startswith(prefix):
            raise AssertionError(f"the IdP answered {line!r}:\n" + "".join(self.output))
        return line.removeprefix(prefix)

    def command(self, command: Mapping[str, Any]) -> Any:
        """Sends `command` and returns the JSON of its answer `IDP OK <json>` (None for a bare
        `IDP OK`); `IDP ERROR` fails."""
        assert self.process.stdin is not None
        with self.commanding:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
            answer = self.answer("IDP OK")
        if not answer:
            return None
        if not answer.startswith(" "):
            raise AssertionError(f"the IdP answered 'IDP OK{answer}'")
        return json.loads(answer)

    def stop(self) -> None:
        stop(self.process)


@dataclass
class Idp:
    """A running IdP. Leash's client is `client_id`/`client_secret` (client_secret_basic unless
    made otherwise); `audience` is the default resource of `access_token`; the resource server's
    client is `RESOURCE_SERVER_CLIENT_ID`/`resource_server_secret` (client_secret_basic)."""

    process: IdpProcess
    issuer: str
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    accounts: dict[str, Account]
    audience: str | None
    harness_secret: str
    resource_server_secret: str
    http: httpx.Client = field(repr=False)
    _discovery: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def harness_callback(self) -> str:
        """A page of the IdP (200) that every client may redirect to."""
        return f"{self.issuer}/harness/callback"

    def set_redirect_uris(self, *redirect_uris: str, client_id: str | None = None) -> None:
        """Replaces the redirect URIs of Leash's client (or of `client_id`)."""
        self.process.command(
            {
                "set_redirect_uris": {
                    "client_id": client_id or self.client_id,
                    "redirect_uris": list(redirect_uris),
                }
            }
        )
        if client_id in (None, self.client_id):
            self.redirect_uris = list(redirect_uris)

    def set_redirect_uri(self, redirect_uri: str) -> None:
        """Leash's client may redirect to `redirect_uri` (e.g. `<leash>/auth/callback`) only."""
        self.set_redirect_uris(redirect_uri)

    def password(self, username: str) -> str:
        return self.accounts[username].password

    def sub(self, username: str) -> str:
        return self.accounts[username].sub

    def discovery(self) -> dict[str, Any]:
        response = self.http.get(f"{self.issuer}/.well-known/openid-configuration")
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document

    def endpoint(self, name: str) -> str:
        """An endpoint of the discovery document (e.g. `token`, `introspection`, `revocation`:
        `<name>_endpoint`), fetched once."""
        if self._discovery is None:
            self._discovery = self.discovery()
        url: str = self._discovery[f"{name}_endpoint"]
        return url

    @property
    def token_endpoint(self) -> str:
        return self.endpoint("token")

    @property
    def introspection_endpoint(self) -> str:
        return self.endpoint("introspection")

    @property
    def revocation_endpoint(self) -> str:
        return self.endpoint("revocation")

    def client_auth(self, client_id: str | None, client_secret: str | None) -> tuple[str, str]:
        """`client_id` (default Leash's) and its secret (default: the IdP's own for its known
        clients), for client_secret_basic."""
        client_id = client_id or self.client_id
        if client_secret is None:
            client_secret = {
                self.client_id: self.client_secret,
                HARNESS_CLIENT_ID: self.harness_secret,
                RESOURCE_SERVER_CLIENT_ID: self.resource_server_secret,
            }.get(client_id, "")
        return client_id, client_secret

    def jwks(self) -> dict[str, Any]:
        response = self.http.get(self.discovery()["jwks_uri"])
        response.raise_for_status()
        jwks: dict[str, Any] = response.json()
        return jwks

    def authorization(
        self,
        *,
        client_id: str | None = None,
        redirect_uri: str | None = None,
        scope: str = "openid email profile groups",
        resource: str | None = None,
        prompt: str | None = None,
    ) -> Authorization:
        """An authorization request of Leash's client (or `client_id`) with PKCE S256, a fresh
        `state` and `nonce` (none without the scope `openid`: oidc-provider refuses a nonce in a
        plain OAuth request), to the harness callback unless `redirect_uri` is given."""
        redirect_uri = redirect_uri or self.harness_callback
        state, pkce = secrets.token_urlsafe(16), Pkce()
        nonce = secrets.token_urlsafe(16) if "openid" in scope.split() else None
        params = {
            "response_type": "code",
            "client_id": client_id or self.client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
        }
        if nonce is not None:
            params["nonce"] = nonce
        if resource is not None:
            params["resource"] = resource
        if prompt is not None:
            params["prompt"] = prompt
        url = f"{self.discovery()['authorization_endpoint']}?{urlencode(params)}"
        return Authorization(url, redirect_uri, state, nonce, pkce)

    def redeem(
        self,
        code: str,
        authorization: Authorization,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        resource: str | None = None,
    ) -> httpx.Response:
        """The token request for `code` (client_secret_basic), as a relying party makes it."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": authorization.redirect_uri,
            "code_verifier": authorization.pkce.verifier,
        }
        if resource is not None:
            form["resource"] = resource
        return self.http.post(
            self.token_endpoint, data=form, auth=self.client_auth(client_id, client_secret)
        )

    def refresh(
        self,
        refresh_token: str,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        scope: str | None = None,
    ) -> httpx.Response:
        """A refresh token grant (client_secret_basic) of Leash's client (or `client_id`): with
        `refresh_tokens`, 200 with a new `refresh_token` (the old one is then spent), or 400
        `invalid_grant`."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope is not None:
            form["scope"] = scope
        return self.http.post(
            self.token_endpoint, data=form, auth=self.client_auth(client_id, client_secret)
        )

    def revoke(
        self,
        token: str,
        *,
        token_type_hint: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
    ) -> httpx.Response:
        """A revocation request (RFC 7009) of the token's client (default Leash's): 200, also for
        an unknown token; a refresh token's revocation revokes its whole grant."""
        form = {"token": token}
        if token_type_hint is not None:
            form["token_type_hint"] = token_type_hint
        return self.http.post(
            self.revocation_endpoint, data=form, auth=self.client_auth(client_id, client_secret)
        )

    def introspect(
        self, token: str, *, client_id: str | None = None, client_secret: str | None = None
    ) -> dict[str, Any]:
        """The introspection (RFC 7662) of `token` as the resource server's client (or
        `client_id`, which sees only its own tokens as active): `{"active": false}`, or `active`
        with `sub`, `client_id`, `scope`, `exp`, `iat`, `iss`, `token_type` (and `aud` for a token
        with a resource)."""
        response = self.http.post(
            self.introspection_endpoint,
            data={"token": token},
            auth=self.client_auth(client_id or RESOURCE_SERVER_CLIENT_ID, client_secret),
        )
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def stats(self) -> dict[str, int]:
        """The IdP's counts since it started: `authorization_code` and `refresh_token` (successful
        token grants), `refresh_token_failed` (refresh grants refused by oidc-provider, not those
        of `fail_token_endpoint`), `revoked` (the revocation endpoint's 200 answers, unknown
        tokens included) and `injected_failures` (token requests `fail_token_endpoint` failed)."""
        counts: dict[str, int] = self.process.command({"stats": {}})
        return counts

    def revoke_refresh_tokens(self, username: str) -> int:
        """Revokes every grant of `username` that has a refresh token, at the IdP and behind the
        clients' backs (their refresh and access tokens die with it); returns how many usable
        refresh tokens it destroyed."""
        answer = self.process.command({"revoke_refresh_tokens": {"sub": self.sub(username)}})
        revoked: int = answer["revoked"]
        return revoked

    def fail_token_endpoint(self, status: int = 503, count: int = 1) -> None:
        """The next `count` token requests (of any client) are answered `status` with
        `{"error":"temporarily_unavailable"}`, without reaching oidc-provider; replaces what
        was pending (`count=0` ends it)."""
        self.process.command({"fail_token_endpoint": {"status": status, "count": count}})

    def tokens(
        self,
        username: str,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        resource: str | None = None,
        scope: str = "openid email profile groups",
    ) -> dict[str, Any]:
        """The token response of a whole code flow of `username` through the harness callback
        (with `refresh_tokens`, it has a `refresh_token`)."""
        authorization = self.authorization(client_id=client_id, resource=resource, scope=scope)
        with httpx.Client(timeout=10) as browser:
            back = login_over_http(browser, authorization.url, username, self.password(username))
        query = redirect_query(back)
        assert query.get("state") == authorization.state, query
        assert "code" in query, query
        response = self.redeem(
            query["code"],
            authorization,
            client_id=client_id,
            client_secret=client_secret,
            resource=resource,
        )
        assert response.status_code == 200, response.text
        tokens: dict[str, Any] = response.json()
        return tokens

    def access_token(self, username: str, audience: str | None = None) -> str:
        """A JWT access token (`typ` at+jwt) of `username` for `audience` (default: the IdP's
        `audience`) with `groups`, from a code flow of the harness's own client."""
        audience = audience or self.audience
        if audience is None:
            raise ValueError("no audience: give one, or make the IdP with one")
        tokens = self.tokens(
            username,
            client_id=HARNESS_CLIENT_ID,
            client_secret=self.harness_secret,
            resource=audience,
        )
        token: str = tokens["access_token"]
        return token

    def id_token(self, username: str) -> str:
        """An ID token of `username` for Leash's client (`aud` = `client_id`)."""
        token: str = self.tokens(username)["id_token"]
        return token


MakeIdp = Callable[..., Idp]


@contextmanager
def start_idp(
    redirect_uris: Iterable[str] = (),
    audience: str | None = None,
    accounts: Mapping[str, Account] | None = None,
    *,
    sso: bool = False,
    token_endpoint_auth_method: str = "client_secret_basic",
    allowed_audiences: Iterable[str] | None = None,
    access_token_ttl: int | None = None,
    refresh_tokens: bool = False,
    refresh_token_ttl: int | None = None,
    scopes: Iterable[str] = (),
) -> Iterator[Idp]:
    """Runs idp.mjs on a free port until the block ends: Leash's client with `redirect_uris`
    (more with `set_redirect_uris`) and a fresh secret, the harness's client, the resource
    server's client, `ACCOUNTS` and `accounts`. With `allowed_audiences`, the IdP refuses other
    resource indicators (`invalid_target`). `access_token_ttl` (seconds, default 600) is the
    lifetime of opaque access tokens; with `refresh_tokens`, every code grant also gives a refresh
    token (lifetime `refresh_token_ttl`, default a day) that every refresh rotates; `scopes` are
    plain OAuth scopes (e.g. `mail.read`) clients may ask for (see tests/idp/idp.mjs)."""
    everyone = {**ACCOUNTS, **(accounts or {})}
    client_secret = secrets.token_urlsafe(32)
    harness_secret = secrets.token_urlsafe(32)
    resource_server_secret = secrets.token_urlsafe(32)
    config: dict[str, Any] = {
        "port": 0,
        "sso": sso,
        "refresh_tokens": refresh_tokens,
        "scopes": list(scopes),
        "clients": [
            {
                "client_id": LEASH_CLIENT_ID,
                "client_secret": client_secret,
                "redirect_uris": list(redirect_uris),
                "token_endpoint_auth_method": token_endpoint_auth_method,
            },
            {"client_id": HARNESS_CLIENT_ID, "client_secret": harness_secret},
            {
                "client_id": RESOURCE_SERVER_CLIENT_ID,
                "client_secret": resource_server_secret,
                "resource_server": True,
            },
        ],
        "accounts": {
            username: {
                "password": account.password,
                "sub": account.sub,
                "email": account.email,
                "groups": list(account.groups),
                "name": account.name or username,
            }
            for username, account in everyone.items()
        },
    }
    if allowed_audiences is not None:
        config["audience"] = list(allowed_audiences)
    if access_token_ttl is not None:
        config["access_token_ttl"] = access_token_ttl
    if refresh_token_ttl is not None:
        config["refresh_token_ttl"] = refresh_token_ttl
    process = IdpProcess(config)
    http = httpx.Client(timeout=10)
    try:
        yield Idp(
            process=process,
            issuer=process.issuer,
            client_id=LEASH_CLIENT_ID,
            client_secret=client_secret,
            redirect_uris=list(redirect_uris),
            accounts=everyone,
            audience=audience,
            harness_secret=harness_secret,
            resource_server_secret=resource_server_secret,
            http=http,
        )
    finally:
        http.close()
        process.stop()


@pytest.fixture
def make_idp() -> Iterator[MakeIdp]:
    """`make_idp(redirect_uris=(), audience=None, accounts=None, *, sso=False,
    token_endpoint_auth_method="client_secret_basic", allowed_audiences=None,
    access_token_ttl=None, refresh_tokens=False, refresh_token_ttl=None, scopes=()) -> Idp`: an
    IdP of the test's own (see `start_idp`), stopped when the test ends."""
    with ExitStack() as stack:

        def make(*args: Any, **kwargs: Any) -> Idp:
            return stack.enter_context(start_idp(*args, **kwargs))

        yield make


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    """One IdP for the test module, with no redirect URI of Leash's yet (`set_redirect_uri`),
    and `DEFAULT_AUDIENCE` as the default audience of `access_token`."""
    with start_idp(audience=DEFAULT_AUDIENCE) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless chromium (Debian's, or `LEASH_CHROMIUM`) under Playwright's sync API, for the test
    module (no longer: the sync API's event loop should not linger into other modules' asyncio
    tests). Playwright's own browser downloads are never used."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium, or set LEASH_CHROMIUM")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


@pytest.fixture
def browser_page(browser: Browser) -> Iterator[Page]:
    """A page in a fresh browser context (no cookies, no storage) for the test."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()
