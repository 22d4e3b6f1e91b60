"""The OIDC test harness on its own, without Leash: the real IdP (tests/idp, oidc-provider), the
hostile IdP and the browser (tests/idp_fixtures.py, tests/idp_hostile.py), so that a failure in
the login and console tests is Leash's and not the harness's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, get_args
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from idp_fixtures import DEFAULT_AUDIENCE, Idp, MakeIdp, Pkce, login_over_http, redirect_query
from idp_hostile import MODES, HostileIdp, Mode, jwt_parts, verify_jwt
from playwright.sync_api import Page

AUDIENCE = DEFAULT_AUDIENCE


def test_discovery(idp: Idp) -> None:
    document = idp.discovery()
    assert document["issuer"] == idp.issuer
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert {"openid", "email", "profile", "groups"} <= set(document["scopes_supported"])
    assert {"email", "preferred_username", "groups"} <= set(document["claims_supported"])
    assert "client_secret_basic" in document["token_endpoint_auth_methods_supported"]
    keys = idp.jwks()["keys"]
    assert [key["kty"] for key in keys] == ["RSA"]
    assert "d" not in keys[0]
    assert keys[0]["kid"]


def test_code_flow_with_pkce_over_http(idp: Idp) -> None:
    redirect_uri = "http://127.0.0.1:9/auth/callback"
    idp.set_redirect_uri(redirect_uri)
    # The scopes of Leash's `[oidc]` example: `groups` comes with `profile` at this IdP.
    authorization = idp.authorization(redirect_uri=redirect_uri, scope="openid email profile")
    with httpx.Client(timeout=10) as http:
        back = login_over_http(http, authorization.url, "alice", idp.password("alice"))
    assert back.status_code in (302, 303)
    assert back.headers["location"].startswith(redirect_uri + "?")
    query = redirect_query(back)
    assert query["state"] == authorization.state
    assert query["iss"] == idp.issuer

    tokens = idp.redeem(query["code"], authorization).json()
    assert tokens["token_type"] == "Bearer"
    header, _ = jwt_parts(tokens["id_token"])
    assert header["alg"] == "RS256"
    claims = verify_jwt(tokens["id_token"], idp.jwks())
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == idp.client_id
    assert claims["sub"] == idp.sub("alice") == "sub-alice"
    assert claims["nonce"] == authorization.nonce
    assert claims["email"] == "alice@example.com"
    assert claims["preferred_username"] == "alice"
    assert claims["groups"] == ["staff"]
    assert claims["exp"] > time.time()

    # The code is single use: the IdP refuses it again (and revokes what it gave).
    replay = idp.redeem(query["code"], authorization)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"


def test_the_token_endpoint_checks_pkce_and_the_client(idp: Idp) -> None:
    authorization = idp.authorization()
    with httpx.Client(timeout=10) as http:
        query = redirect_query(login_over_http(http, authorization.url, "bob", "bob-password"))
    wrong = idp.redeem(query["code"], authorization, client_secret="not-the-secret")
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    other_verifier = Pkce()
    bad = idp.redeem(
        query["code"],
        type(authorization)(
            authorization.url,
            authorization.redirect_uri,
            authorization.state,
            authorization.nonce,
            other_verifier,
        ),
    )
    assert bad.status_code == 400
    assert bad.json()["error"] == "invalid_grant"


def test_pkce_is_required_and_redirect_uris_are_exact(idp: Idp) -> None:
    authorization = idp.authorization()
    query = parse_qs(urlsplit(authorization.url).query)
    del query["code_challenge"], query["code_challenge_method"]
    endpoint = idp.discovery()["authorization_endpoint"]
    with httpx.Client(timeout=10) as http:
        answer = http.get(f"{endpoint}?{urlencode(query, doseq=True)}")
        assert answer.is_redirect
        assert redirect_query(answer)["error"] == "invalid_request"
        unknown = idp.authorization(redirect_uri="http://127.0.0.1:9/elsewhere")
        refused = http.get(unknown.url)
        assert refused.status_code == 400
        assert "redirect_uri" in refused.text


def test_a_wrong_password_is_refused(idp: Idp) -> None:
    authorization = idp.authorization()
    with httpx.Client(timeout=10) as http, pytest.raises(AssertionError, match="refused"):
        login_over_http(http, authorization.url, "alice", "bob-password")


def test_a_second_login_is_asked_for_not_reused(idp: Idp) -> None:
    """Without `sso`, every authorization shows the login page: one client logging in as alice
    then as root gets root."""
    with httpx.Client(timeout=10) as http:
        for username in ("alice", "root"):
            authorization = idp.authorization()
            back = login_over_http(http, authorization.url, username, idp.password(username))
            tokens = idp.redeem(redirect_query(back)["code"], authorization).json()
            claims = verify_jwt(tokens["id_token"], idp.jwks())
            assert claims["preferred_username"] == username
        assert claims["groups"] == ["leash-admins"]


def test_prompt_login_with_sso(make_idp: MakeIdp) -> None:
    """With `sso`, a second authorization reuses the IdP session, and `prompt=login` asks again."""
    idp = make_idp(sso=True)
    with httpx.Client(timeout=10) as http:
        first = idp.authorization()
        login_over_http(http, first.url, "alice", "alice-password")
        again = http.get(idp.authorization().url, follow_redirects=True)
        assert str(again.url).startswith(idp.harness_callback)
        forced = idp.authorization(prompt="login")
        back = login_over_http(http, forced.url, "bob", "bob-password")
        tokens = idp.redeem(redirect_query(back)["code"], forced).json()
        assert verify_jwt(tokens["id_token"], idp.jwks())["sub"] == "sub-bob"


def test_access_token_is_an_at_jwt_for_the_audience(idp: Idp) -> None:
    token = idp.access_token("root")
    header, _ = jwt_parts(token)
    assert header["typ"] == "at+jwt"
    claims = verify_jwt(token, idp.jwks())
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == "sub-root"
    assert claims["groups"] == ["leash-admins"]
    assert claims["exp"] > time.time()
    other = verify_jwt(idp.access_token("alice", "https://elsewhere.test"), idp.jwks())
    assert other["aud"] == "https://elsewhere.test"
    assert other["groups"] == ["staff"]


def test_scopes_decide_the_id_token_claims(idp: Idp) -> None:
    authorization = idp.authorization(scope="openid groups")
    with httpx.Client(timeout=10) as http:
        back = login_over_http(http, authorization.url, "root", idp.password("root"))
    tokens = idp.redeem(redirect_query(back)["code"], authorization).json()
    claims = verify_jwt(tokens["id_token"], idp.jwks())
    assert claims["groups"] == ["leash-admins"]
    assert "email" not in claims
    assert "preferred_username" not in claims


def test_id_token_is_for_leash(idp: Idp) -> None:
    token = idp.id_token("mallory")
    header, _ = jwt_parts(token)
    assert header.get("typ") != "at+jwt"
    claims = verify_jwt(token, idp.jwks())
    assert claims["aud"] == idp.client_id
    assert claims["sub"] == "sub-mallory"
    assert claims["groups"] == []


def test_client_secret_post_and_allowed_audiences(make_idp: MakeIdp) -> None:
    idp = make_idp(token_endpoint_auth_method="client_secret_post", allowed_audiences=[AUDIENCE])
    authorization = idp.authorization()
    with httpx.Client(timeout=10) as http:
        query = redirect_query(login_over_http(http, authorization.url, "alice", "alice-password"))
    token_endpoint = idp.discovery()["token_endpoint"]
    form = {
        "grant_type": "authorization_code",
        "code": query["code"],
        "redirect_uri": authorization.redirect_uri,
        "code_verifier": authorization.pkce.verifier,
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
    }
    answer = idp.http.post(token_endpoint, data=form)
    assert answer.status_code == 200, answer.text
    assert "id_token" in answer.json()
    assert verify_jwt(idp.access_token("alice", AUDIENCE), idp.jwks())["aud"] == AUDIENCE
    refused = idp.authorization(resource="https://elsewhere.test")
    with httpx.Client(timeout=10) as http:
        answer = http.get(refused.url)
    assert redirect_query(answer)["error"] == "invalid_target"


def pkce_s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def hostile_flow(
    hostile: HostileIdp, nonce: str = "the-nonce"
) -> tuple[httpx.Response, dict[str, str]]:
    """The hostile IdP's authorization and token requests, as Leash makes them."""
    verifier = secrets.token_urlsafe(48)
    params = {
        "response_type": "code",
        "client_id": hostile.client_id,
        "redirect_uri": "http://127.0.0.1:9/auth/callback",
        "scope": "openid email profile",
        "state": "the-state",
        "nonce": nonce,
        "code_challenge": pkce_s256(verifier),
        "code_challenge_method": "S256",
    }
    with httpx.Client(timeout=10) as http:
        document = http.get(f"{hostile.issuer}/.well-known/openid-configuration").json()
        back = http.get(f"{document['authorization_endpoint']}?{urlencode(params)}")
        assert back.status_code == 302
        query = redirect_query(back)
        assert query["state"] == "the-state"
        assert query["iss"] == hostile.issuer
        form = {
            "grant_type": "authorization_code",
            "code": query["code"],
            "redirect_uri": params["redirect_uri"],
            "code_verifier": verifier,
        }
        answer = http.post(
            document["token_endpoint"],
            data=form,
            auth=(hostile.client_id, hostile.client_secret),
        )
        return answer, form


def test_hostile_idp_good_flow_and_its_checks(hostile_idp: HostileIdp) -> None:
    answer, form = hostile_flow(hostile_idp)
    assert answer.status_code == 200
    claims = verify_jwt(answer.json()["id_token"], hostile_idp.jwks())
    assert claims["iss"] == hostile_idp.issuer
    assert claims["aud"] == "leash"
    assert claims["nonce"] == "the-nonce"
    assert claims["groups"] == ["staff"]
    with httpx.Client(timeout=10) as http:
        token_endpoint = f"{hostile_idp.issuer}/token"
        secret = (hostile_idp.client_id, hostile_idp.client_secret)
        replay = http.post(token_endpoint, data=form, auth=secret)
        assert replay.status_code == 400
        assert replay.json()["error"] == "invalid_grant"
        assert http.post(token_endpoint, data=form, auth=("leash", "wrong")).status_code == 401
    # A wrong PKCE verifier is refused (and burns the code).
    verifier = secrets.token_urlsafe(48)
    location = hostile_idp.authorize(
        {
            "client_id": "leash",
            "redirect_uri": "http://127.0.0.1:9/cb",
            "code_challenge": pkce_s256(verifier),
            "code_challenge_method": "S256",
        }
    )
    code = parse_qs(urlsplit(location).query)["code"][0]
    status, body = hostile_idp.token(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": "http://127.0.0.1:9/cb",
            "code_verifier": verifier + "x",
            "client_id": "leash",
            "client_secret": hostile_idp.client_secret,
        },
        None,
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert len(hostile_idp.token_requests) == 4


@pytest.mark.parametrize("mode", MODES)
def test_hostile_idp_modes(hostile_idp: HostileIdp, mode: Mode) -> None:
    hostile_idp.mode = mode
    answer, _ = hostile_flow(hostile_idp)
    assert answer.status_code == 200
    token = answer.json()["id_token"]
    header, claims = jwt_parts(token)
    jwks = hostile_idp.jwks()
    verified: dict[str, Any] | None
    try:
        verified = verify_jwt(token, jwks)
    except ValueError:
        verified = None
    if mode in ("other_key", "unknown_kid", "alg_none", "hs256_with_client_secret"):
        assert verified is None
    else:
        assert verified == claims
    expected_alg = {"alg_none": "none", "hs256_with_client_secret": "HS256"}.get(mode, "RS256")
    assert header["alg"] == expected_alg
    if mode == "wrong_nonce":
        assert claims["nonce"] != "the-nonce"
    elif mode == "missing_nonce":
        assert "nonce" not in claims
    else:
        assert claims["nonce"] == "the-nonce"
    assert (claims["iss"] == hostile_idp.issuer) == (mode != "wrong_iss")
    assert (claims["aud"] == "leash") == (mode != "wrong_aud")
    assert (claims["exp"] < time.time()) == (mode == "expired")
    if mode == "other_key":
        assert header["kid"] == jwks["keys"][0]["kid"]
    if mode == "unknown_kid":
        assert header["kid"] != jwks["keys"][0]["kid"]
    if mode == "alg_none":
        assert token.endswith(".")
    if mode == "hs256_with_client_secret":
        signing_input, _, signature = token.rpartition(".")
        key = hostile_idp.client_secret.encode()
        mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
        assert signature == base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_hostile_modes_are_the_literal_type() -> None:
    assert set(MODES) == set(get_args(Mode))


def test_hostile_mint_access_token(hostile_idp: HostileIdp) -> None:
    jwks = hostile_idp.jwks()
    token = hostile_idp.mint_access_token("sub-alice", AUDIENCE, ["staff"])
    header, _ = jwt_parts(token)
    assert header["typ"] == "at+jwt"
    assert header["kid"] == jwks["keys"][0]["kid"]
    claims = verify_jwt(token, jwks)
    assert (claims["iss"], claims["sub"], claims["aud"]) == (
        hostile_idp.issuer,
        "sub-alice",
        AUDIENCE,
    )
    assert claims["groups"] == ["staff"]
    assert claims["exp"] > time.time()
    other = hostile_idp.mint_access_token(
        "sub-alice", AUDIENCE, iss="https://else.test", exp=1, key="other"
    )
    with pytest.raises(ValueError, match="bad signature"):
        verify_jwt(other, jwks)
    _, claims = jwt_parts(other)
    assert (claims["iss"], claims["exp"]) == ("https://else.test", 1)


@pytest.fixture
def redirect_target() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A relying party's callback that records each query it receives and answers 200."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/auth/callback":  # the browser's /favicon.ico
                self.send_error(404)
                return
            query = parse_qs(url.query)
            seen.append({name: values[0] for name, values in query.items()})
            body = b"<!doctype html><title>callback</title><p>back at the relying party"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/auth/callback", seen
    server.shutdown()
    server.server_close()


def test_browser_logs_in_at_the_idp(
    idp: Idp, browser_page: Page, redirect_target: tuple[str, list[dict[str, str]]]
) -> None:
    callback, seen = redirect_target
    idp.set_redirect_uri(callback)
    authorization = idp.authorization(redirect_uri=callback)
    page = browser_page
    page.goto(authorization.url)
    page.fill("#username", "root")
    page.fill("#password", "wrong")
    page.click("#submit")
    assert page.locator("#error").inner_text() == "invalid username or password"
    page.fill("#password", idp.password("root"))
    page.click("#submit")
    page.wait_for_url(callback + "?*")
    assert "back at the relying party" in page.content()
    assert len(seen) == 1
    assert seen[0]["state"] == authorization.state
    tokens = idp.redeem(seen[0]["code"], authorization).json()
    claims = verify_jwt(tokens["id_token"], idp.jwks())
    assert claims["sub"] == "sub-root"
    assert claims["nonce"] == authorization.nonce
