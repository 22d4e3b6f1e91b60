"""The OIDC test harness on its own, without Leash: the real IdP (tests/idp, oidc-provider), also
as an upstream's OAuth server with the upstream's API (tests/upstream_api.py), the hostile IdP and
the browser (tests/idp_fixtures.py, tests/idp_hostile.py), so that a failure in the login,
console and OAuth connection tests is Leash's and not the harness's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, get_args
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from idp_fixtures import (
    DEFAULT_AUDIENCE,
    HARNESS_CLIENT_ID,
    Idp,
    MakeIdp,
    Pkce,
    login_over_http,
    redirect_query,
)
from idp_hostile import MODES, HostileIdp, Mode, jwt_parts, verify_jwt
from playwright.sync_api import Page
from upstream_api import MakeResourceServer, token_hash

AUDIENCE = DEFAULT_AUDIENCE


def test_discovery(idp: Idp) -> None:
    document = idp.discovery()
    assert document["issuer"] == idp.issuer
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert {"openid", "email", "profile", "groups"} <= set(document["scopes_supported"])
    assert {"email", "preferred_username", "groups"} <= set(document["claims_supported"])
    assert "client_secret_basic" in document["token_endpoint_auth_methods_supported"]
    # RFC 9207, 7009 and 7662.
    assert document["authorization_response_iss_parameter_supported"] is True
    assert document["revocation_endpoint"] == f"{idp.issuer}/token/revocation"
    assert document["introspection_endpoint"] == f"{idp.issuer}/token/introspection"
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


# The IdP as an upstream's OAuth server (refresh tokens, introspection, revocation), and the
# upstream's API.

MAIL_SCOPE = "mail.read"


def upstream_idp(make_idp: MakeIdp, **kwargs: Any) -> Idp:
    return make_idp(refresh_tokens=True, scopes=[MAIL_SCOPE], **kwargs)


def error_of(response: httpx.Response) -> str:
    error: str = response.json()["error"]
    return error


def test_refresh_tokens_rotate_and_a_reused_one_fails(make_idp: MakeIdp) -> None:
    idp = upstream_idp(make_idp)
    assert idp.stats() == {
        "authorization_code": 0,
        "refresh_token": 0,
        "refresh_token_failed": 0,
        "revoked": 0,
        "injected_failures": 0,
    }
    tokens = idp.tokens("alice", scope=f"openid {MAIL_SCOPE}")
    first = tokens["refresh_token"]
    assert tokens["scope"] == f"openid {MAIL_SCOPE}"
    assert tokens["expires_in"] == 600
    assert "id_token" in tokens

    refreshed = idp.refresh(first)
    assert refreshed.status_code == 200, refreshed.text
    second = refreshed.json()["refresh_token"]
    assert second != first
    assert refreshed.json()["access_token"] != tokens["access_token"]
    assert refreshed.json()["scope"] == f"openid {MAIL_SCOPE}"
    assert idp.introspect(refreshed.json()["access_token"])["active"] is True

    # Another client may not use it; the rotated-away one is refused, and its reuse revokes the
    # whole grant: the newest refresh token and the access tokens die with it.
    other = idp.refresh(second, client_id=HARNESS_CLIENT_ID)
    assert (other.status_code, error_of(other)) == (400, "invalid_grant")
    reused = idp.refresh(first)
    assert (reused.status_code, error_of(reused)) == (400, "invalid_grant")
    after = idp.refresh(second)
    assert (after.status_code, error_of(after)) == (400, "invalid_grant")
    assert idp.introspect(refreshed.json()["access_token"]) == {"active": False}
    assert idp.stats() == {
        "authorization_code": 1,
        "refresh_token": 1,
        "refresh_token_failed": 3,
        "revoked": 0,
        "injected_failures": 0,
    }


def test_plain_oauth_scopes_and_concurrent_refreshes(make_idp: MakeIdp) -> None:
    """A client may ask for `mail.read` alone (no ID token); of two concurrent refreshes with one
    refresh token, one succeeds and the other is a reuse (the IdP handles token requests one at a
    time), which revokes the grant."""
    idp = upstream_idp(make_idp)
    tokens = idp.tokens("bob", scope=MAIL_SCOPE)
    assert "id_token" not in tokens
    assert tokens["scope"] == MAIL_SCOPE
    introspection = idp.introspect(tokens["access_token"])
    assert introspection["active"] is True
    assert (introspection["sub"], introspection["client_id"]) == ("sub-bob", idp.client_id)
    assert introspection["scope"] == MAIL_SCOPE
    assert introspection["iss"] == idp.issuer
    assert introspection["token_type"] == "Bearer"
    assert "aud" not in introspection
    # An unknown scope is dropped, not refused.
    assert idp.tokens("bob", scope=f"{MAIL_SCOPE} mail.write")["scope"] == MAIL_SCOPE

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(idp.refresh, [tokens["refresh_token"]] * 2))
    assert sorted(answer.status_code for answer in answers) == [200, 400]
    (winner,) = (answer for answer in answers if answer.status_code == 200)
    (loser,) = (answer for answer in answers if answer.status_code == 400)
    assert error_of(loser) == "invalid_grant"
    assert error_of(idp.refresh(winner.json()["refresh_token"])) == "invalid_grant"
    stats = idp.stats()
    assert (stats["authorization_code"], stats["refresh_token"]) == (2, 1)
    assert stats["refresh_token_failed"] == 2


def test_access_token_ttl_and_the_resource_server(
    make_idp: MakeIdp, make_resource_server: MakeResourceServer
) -> None:
    idp = upstream_idp(make_idp, access_token_ttl=2)
    api = make_resource_server(idp)
    tokens = idp.tokens("alice", scope=MAIL_SCOPE)
    token = tokens["access_token"]
    assert tokens["expires_in"] == 2
    assert idp.introspect(token)["active"] is True
    # Another client (the harness's) sees only its own tokens; Leash's sees its own.
    assert idp.introspect(token, client_id=HARNESS_CLIENT_ID) == {"active": False}
    assert idp.introspect(token, client_id=idp.client_id)["active"] is True

    with httpx.Client(base_url=api.url, timeout=10) as http:
        answer = http.get(
            "/v1/messages?folder=inbox",
            headers={"Authorization": f"Bearer {token}", "X-Request": "one"},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "sub": "sub-alice",
            "client_id": idp.client_id,
            "scope": MAIL_SCOPE,
            "method": "GET",
            "path": "/v1/messages?folder=inbox",
        }
        time.sleep(3)
        assert idp.introspect(token) == {"active": False}
        expired = http.post(
            "/v1/messages", headers={"Authorization": f"Bearer {token}"}, json={"to": "bob"}
        )
        assert expired.status_code == 401
        assert expired.json() == {"error": "invalid_token"}
        assert expired.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        # A refresh gives a live one again.
        fresh = idp.refresh(tokens["refresh_token"]).json()["access_token"]
        again = http.get("/v1/messages", headers={"Authorization": f"Bearer {fresh}"})
        assert again.status_code == 200

    seen = api.requests()
    assert [(r.method, r.path, r.status) for r in seen] == [
        ("GET", "/v1/messages?folder=inbox", 200),
        ("POST", "/v1/messages", 401),
        ("GET", "/v1/messages", 200),
    ]
    assert [r.token_sha256 for r in seen] == [token_hash(token)] * 2 + [token_hash(fresh)]
    assert seen[0].headers["x-request"] == "one"
    assert "authorization" not in seen[0].headers
    assert seen[1].body == b'{"to":"bob"}'
    assert token not in repr(seen)


def test_resource_server_refuses_missing_and_garbage_tokens(
    idp: Idp, make_resource_server: MakeResourceServer
) -> None:
    api = make_resource_server(idp)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for headers in (
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer not-a-token"},
            {"Authorization": f"Basic {base64.b64encode(b'a:b').decode()}"},
        ):
            answer = http.get("/v1/me", headers=headers)
            assert answer.status_code == 401, headers
            assert answer.json() == {"error": "invalid_token"}
            assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    hashes = [r.token_sha256 for r in api.requests()]
    assert hashes == [None, None, token_hash("not-a-token"), None]


def test_resource_server_required_scope_and_50_concurrent_requests(
    make_idp: MakeIdp, make_resource_server: MakeResourceServer
) -> None:
    idp = upstream_idp(make_idp)
    api = make_resource_server(idp, required_scope=MAIL_SCOPE)
    token = idp.tokens("alice", scope=MAIL_SCOPE)["access_token"]
    without = idp.tokens("bob", scope="openid")["access_token"]
    with httpx.Client(base_url=api.url, timeout=10) as http:
        refused = http.get("/v1/me", headers={"Authorization": f"Bearer {without}"})
        assert refused.status_code == 403
        assert refused.json() == {"error": "insufficient_scope"}

        def call(n: int) -> int:
            answer = http.get(f"/v1/items/{n}", headers={"Authorization": f"Bearer {token}"})
            assert answer.json()["path"] == f"/v1/items/{n}"
            return answer.status_code

        with ThreadPoolExecutor(50) as pool:
            assert list(pool.map(call, range(50))) == [200] * 50
    paths = sorted(r.path for r in api.requests() if r.status == 200)
    assert paths == sorted(f"/v1/items/{n}" for n in range(50))


def test_stats_revocation_and_revoke_refresh_tokens(make_idp: MakeIdp) -> None:
    idp = upstream_idp(make_idp)
    alice = idp.tokens("alice", scope=MAIL_SCOPE)
    alice_again = idp.tokens("alice", scope=MAIL_SCOPE, client_id=HARNESS_CLIENT_ID)
    bob = idp.tokens("bob", scope=MAIL_SCOPE)
    assert idp.refresh(alice["refresh_token"]).status_code == 200

    # Behind the clients' backs: both of alice's grants (not bob's), whatever client.
    assert idp.revoke_refresh_tokens("alice") == 2
    assert idp.revoke_refresh_tokens("alice") == 0
    for tokens, client_id in ((alice, None), (alice_again, HARNESS_CLIENT_ID)):
        refused = idp.refresh(tokens["refresh_token"], client_id=client_id)
        assert (refused.status_code, error_of(refused)) == (400, "invalid_grant")
    assert idp.introspect(alice_again["access_token"]) == {"active": False}
    assert idp.introspect(bob["access_token"])["active"] is True

    # RFC 7009 by the client: 200, also for an unknown token; the refresh token's grant dies.
    assert idp.revoke(bob["refresh_token"], token_type_hint="refresh_token").status_code == 200
    assert idp.revoke("not-a-token").status_code == 200
    refused = idp.refresh(bob["refresh_token"])
    assert (refused.status_code, error_of(refused)) == (400, "invalid_grant")
    assert idp.introspect(bob["access_token"]) == {"active": False}
    assert idp.stats() == {
        "authorization_code": 3,
        "refresh_token": 1,
        "refresh_token_failed": 3,
        "revoked": 2,
        "injected_failures": 0,
    }


def test_fail_token_endpoint(make_idp: MakeIdp) -> None:
    idp = upstream_idp(make_idp)
    tokens = idp.tokens("alice", scope=MAIL_SCOPE)
    idp.fail_token_endpoint(503, 2)
    for _ in range(2):
        failed = idp.refresh(tokens["refresh_token"])
        assert failed.status_code == 503
        assert failed.json() == {"error": "temporarily_unavailable"}
    # The failures never reached oidc-provider: the refresh token is still the live one.
    refreshed = idp.refresh(tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    idp.fail_token_endpoint(500, 1)
    assert idp.refresh(refreshed.json()["refresh_token"]).status_code == 500
    assert idp.refresh(refreshed.json()["refresh_token"]).status_code == 200
    stats = idp.stats()
    assert (stats["refresh_token"], stats["refresh_token_failed"]) == (2, 0)
    assert stats["injected_failures"] == 3
