"""An outsider's attacks on human login, sessions and the web console (issue #31; API §0, §7,
§13; ATTACKS 36-39 and 53-55), beyond what test_login.py covers.

Every test runs the real `leash` binary against a real IdP (npm oidc-provider), the hostile IdP
of idp_hostile.py, or a real chromium. Each test is an attack, refused. The review's six
findings (a callback without `iss` from an IdP that always sends it, IdP Bearer tokens not
typed `at+jwt` or with `crit`, an empty `sub`, `azp` naming another client, ID-token claims of
the wrong type answered 502) were fixed; their tests are here with the rest."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Leash
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from idp_fixtures import DEFAULT_AUDIENCE, Idp, login_over_http
from idp_hostile import HostileIdp, b64url, sign
from login_helpers import (
    SECRET_ENV,
    MakeLeash,
    agent_for,
    browser,
    leash_for,
    log_in,
    me,
    oidc_section,
    origin,
    session_cookie,
    start,
)
from playwright.sync_api import ConsoleMessage, Dialog, Page

from leash_agent import Agent

# --- helpers ------------------------------------------------------------------------------------


def fresh(leash: Leash) -> httpx.Client:
    """A browser that never reuses a connection (Leash may close one after a refusal)."""
    return httpx.Client(
        base_url=leash.url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
    )


def sign_in(leash: Leash, idp: Idp, username: str) -> httpx.Client:
    """`log_in`, then the person's browser on connections that are never reused (a reuse that
    races Leash closing an idle keep-alive connection is no answer of Leash's)."""
    logged_in = log_in(leash, idp, username)
    client = fresh(leash)
    client.cookies = logged_in.cookies
    logged_in.close()
    return client


@pytest.fixture
def hostile_leash(make_leash: MakeLeash, hostile_idp: HostileIdp) -> Leash:
    return make_leash(oidc_section(hostile_idp.issuer), {SECRET_ENV: hostile_idp.client_secret})


def hostile_login(
    leash: Leash, return_to: str | None = None
) -> tuple[httpx.Client, httpx.Response]:
    """A whole login at the hostile IdP (no login page): the browser and the callback's answer."""
    client = fresh(leash)
    params = {"return_to": return_to} if return_to is not None else None
    answer = client.get("/login", params=params)
    assert answer.status_code == 302, answer.text
    back = client.get(answer.headers["location"])
    return client, client.get(back.headers["location"])


def bearer(leash: Leash, token: str) -> httpx.Response:
    return fresh(leash).get("/v1/me", headers={"Authorization": f"Bearer {token}"})


def rs256(idp: HostileIdp, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A JWS signed by the IdP's JWKS key with exactly `header`."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = idp.key.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


def access_claims(idp: HostileIdp, sub: str = "sub-z") -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": idp.issuer,
        "sub": sub,
        "aud": DEFAULT_AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": f"j-{time.monotonic_ns()}",
        "client_id": "leash",
    }


# --- login: return_to, the callback, the login cookie (ATTACKS 54) ------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/%2F%2Fevil.example",
        "/%5Cevil.example",
        "/\\/evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "/ /evil.example",
        "https:evil.example",
        "javascript:alert(1)",
        "/\u3002evil.example",
        "/\uff0f/evil.example",
        "%2F%2Fevil.example",
        "/console\r\nSet-Cookie: leash_session=planted",
        "/console%0d%0aSet-Cookie:%20leash_session=planted",
        "/x" * 1500,
    ],
)
def test_return_to_tricks_never_leave_the_origin_nor_inject_headers(
    hostile_leash: Leash, target: str
) -> None:
    client, done = hostile_login(hostile_leash, target)
    assert done.status_code == 303, done.text
    location = done.headers["location"]
    resolved = httpx.URL(hostile_leash.url).join(location)
    assert resolved.host == "127.0.0.1"
    assert resolved.port == httpx.URL(hostile_leash.url).port
    assert location.startswith("/")
    assert not location.startswith(("//", "/\\"))
    assert all(ch not in location for ch in "\r\n\t\\ ")
    assert "planted" not in " ".join(done.headers.get_list("set-cookie"))
    assert me(client).status_code == 200


def test_an_idp_error_answer_is_reflected_only_as_json_and_ends_the_login(
    hostile_leash: Leash,
) -> None:
    client = fresh(hostile_leash)
    state = dict(httpx.URL(start(client)).params)["state"]
    script = "<script>window.__pwned=1</script>"
    answer = client.get(
        "/auth/callback",
        params={
            "error": script,
            "error_description": "<img src=x onerror=alert(1)>",
            "state": state,
        },
    )
    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("application/json")
    assert "<script" not in answer.headers["content-type"]
    assert session_cookie(client) is None
    # The login is over: its state completes nothing afterwards.
    other = client.get(f"/auth/callback?state={state}&code=x")
    assert other.status_code == 400
    assert session_cookie(client) is None


def test_a_second_login_in_the_same_browser_voids_the_first_ones_callback(
    hostile_leash: Leash,
) -> None:
    """Two logins in one browser: the first one's state cannot complete with the second's login
    cookie (login cookie reuse across logins)."""
    client = fresh(hostile_leash)
    first = client.get(start(client))
    second_authorize = start(client)
    refused = client.get(first.headers["location"])
    assert refused.status_code == 400, refused.text
    assert session_cookie(client) is None
    assert second_authorize


def test_duplicated_or_huge_callback_parameters_are_refused(hostile_leash: Leash) -> None:
    client = fresh(hostile_leash)
    back = client.get(start(client))
    location = back.headers["location"]
    query = httpx.URL(location).params
    duplicated = f"/auth/callback?{httpx.URL(location).query.decode()}&state=other&code=other"
    assert client.get(duplicated).status_code == 400
    assert session_cookie(client) is None
    client = fresh(hostile_leash)
    state = dict(httpx.URL(start(client)).params)["state"]
    huge = client.get(f"/auth/callback?state={state}&code={'A' * 60000}")
    assert huge.status_code in (400, 414, 431)
    assert session_cookie(client) is None
    assert query["code"]


def test_an_id_token_with_an_empty_subject_makes_no_session(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    hostile_idp.claims["sub"] = ""
    client, done = hostile_login(hostile_leash)
    assert done.status_code == 400, done.text
    assert session_cookie(client) is None


@pytest.mark.parametrize(
    "claims",
    [{"sub": None}, {"sub": 12345}, {"groups": "leash-admins"}, {"groups": [["leash-admins"]]}],
    ids=["sub-null", "sub-number", "groups-string", "groups-nested"],
)
def test_an_id_token_with_claims_of_the_wrong_type_makes_no_session(
    hostile_leash: Leash, hostile_idp: HostileIdp, claims: dict[str, Any]
) -> None:
    hostile_idp.claims.update(claims)
    client, done = hostile_login(hostile_leash)
    assert done.status_code != 303, done.text
    assert session_cookie(client) is None


@pytest.mark.parametrize(
    "claims",
    [{"sub": None}, {"sub": 12345}, {"groups": "leash-admins"}, {"groups": [["leash-admins"]]}],
    ids=["sub-null", "sub-number", "groups-string", "groups-nested"],
)
def test_an_id_token_with_claims_of_the_wrong_type_is_a_400_not_a_502(
    hostile_leash: Leash, hostile_idp: HostileIdp, claims: dict[str, Any]
) -> None:
    hostile_idp.claims.update(claims)
    _, done = hostile_login(hostile_leash)
    assert done.status_code == 400, done.text


@pytest.mark.parametrize(
    "groups",
    [
        "leash-admins",
        [["leash-admins"]],
        "staff leash-admins",
        {"leash-admins": True},
        ["LEASH-ADMINS"],
    ],
    ids=["string", "nested", "space-separated", "object", "case"],
)
def test_groups_of_the_wrong_shape_never_make_an_admin(
    hostile_leash: Leash, hostile_idp: HostileIdp, groups: Any
) -> None:
    hostile_idp.claims["groups"] = groups
    hostile_idp.claims["sub"] = f"sub-groups-{time.monotonic_ns()}"
    client, done = hostile_login(hostile_leash)
    if done.status_code == 303:
        assert me(client).json()["admin"] is False
        assert client.get("/v1/users").status_code == 403
    else:
        assert session_cookie(client) is None


def test_an_id_token_with_several_audiences_needs_azp_naming_leash(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    """OIDC Core §3.1.3.7: with several audiences, `azp` must be present and be the client."""
    hostile_idp.claims.update({"aud": ["leash", "other-client"], "azp": "other-client"})
    client, done = hostile_login(hostile_leash)
    assert done.status_code == 400, done.text
    assert session_cookie(client) is None


def test_get_logout_is_no_logout(leash_idp_alice: tuple[Leash, httpx.Client]) -> None:
    """A link or an image (GET, no Origin) cannot end the session, nor can an unknown method."""
    _, alice = leash_idp_alice
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        alice.request(method, "/logout")
    assert me(alice).status_code == 200


# --- sessions: CSRF, cookie tossing, methods (ATTACKS 55) ---------------------------------------


@pytest.fixture
def leash_idp_alice(make_leash: MakeLeash, idp: Idp) -> tuple[Leash, httpx.Client]:
    leash = leash_for(make_leash, idp)
    return leash, sign_in(leash, idp, "alice")


@pytest.mark.parametrize(
    "value",
    [
        "{url}/",
        "{url_upper}",
        "http://localhost:{port}",
        "https://127.0.0.1:{port}",
        "http://127.0.0.1",
        "http://127.0.0.1:{port}.evil.example",
        "http://127.0.0.1:{port}@evil.example",
        "null",
    ],
)
def test_an_origin_that_is_almost_leashs_is_refused(
    leash_idp_alice: tuple[Leash, httpx.Client], value: str
) -> None:
    leash, alice = leash_idp_alice
    url = httpx.URL(leash.url)
    header = value.format(url=leash.url, url_upper=leash.url.upper(), port=url.port)
    answer = alice.put(
        "/v1/vault/mail", json={"kind": "bearer", "secret": "s"}, headers={"Origin": header}
    )
    assert answer.status_code == 403, (header, answer.text)
    assert alice.get("/v1/vault").json()["credentials"] == []


def test_two_origin_headers_or_a_referer_alone_are_no_origin(
    leash_idp_alice: tuple[Leash, httpx.Client],
) -> None:
    leash, alice = leash_idp_alice
    body = {"kind": "bearer", "secret": "s"}
    for headers in (
        [("Origin", "https://evil.example"), ("Origin", leash.url)],
        [("Origin", leash.url), ("Origin", "https://evil.example")],
        [("Referer", f"{leash.url}/console")],
        [("Sec-Fetch-Site", "same-origin")],
    ):
        cookie = f"leash_session={session_cookie(alice)}"
        answer = fresh(leash).request(
            "PUT", "/v1/vault/mail", json=body, headers=[*headers, ("Cookie", cookie)]
        )
        assert answer.status_code == 403, (headers, answer.text)
    assert alice.get("/v1/vault").json()["credentials"] == []


STATE_CHANGES = [
    "/v1/vault/mail",
    "/v1/grants",
    "/v1/grants/grt_x/revoke",
    "/v1/grants/grt_x/complete",
    "/v1/approvals/apr_x/approve",
    "/v1/approvals/apr_x/deny",
    "/v1/users",
    "/v1/users/usr_x/disable",
    "/v1/agents",
    "/v1/agents/x/disable",
    "/logout",
]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_no_method_changes_state_by_cookie_without_origin(
    make_leash: MakeLeash, idp: Idp, method: str
) -> None:
    leash = leash_for(make_leash, idp)
    root = sign_in(leash, idp, "root")
    cookie = {"Cookie": f"leash_session={session_cookie(root)}"}
    for path in STATE_CHANGES:
        answer = fresh(leash).request(method, path, json={"name": "x"}, headers=cookie)
        assert answer.status_code in (403, 404, 405), (method, path, answer.text)
        if answer.status_code == 403:
            assert answer.json()["error"] in ("csrf", "forbidden"), answer.text
    assert me(root).status_code == 200
    users = leash.call("GET", "/v1/users", leash.admin_key).json()["users"]
    assert all(u["name"] != "x" for u in users)


def test_two_session_cookies_of_the_same_name_authenticate_no_one(
    leash_idp_alice: tuple[Leash, httpx.Client], idp: Idp
) -> None:
    """Cookie tossing: a sibling origin plants a second `leash_session`; neither order lets the
    planted one (or an attacker's own session) act for the victim."""
    leash, alice = leash_idp_alice
    mallory = sign_in(leash, idp, "mallory")
    victim, attacker = session_cookie(alice), session_cookie(mallory)
    for cookie in (
        f"leash_session={attacker}; leash_session={victim}",
        f"leash_session={victim}; leash_session={attacker}",
    ):
        answer = fresh(leash).get("/v1/me", headers={"Cookie": cookie})
        if answer.status_code == 200:
            # Whichever is taken, a write must still need Origin and never cross people.
            assert answer.json()["name"] in ("alice@example.com", "mallory@example.com")
        else:
            assert answer.status_code == 401


def test_a_bad_authorization_never_falls_back_to_the_cookie(
    leash_idp_alice: tuple[Leash, httpx.Client],
) -> None:
    leash, alice = leash_idp_alice
    cookie = f"leash_session={session_cookie(alice)}"
    for scheme in ("Bearer garbage", "Basic Zm9vOmJhcg==", "DPoP x"):
        answer = fresh(leash).put(
            "/v1/vault/mail",
            json={"kind": "bearer", "secret": "s"},
            headers={"Cookie": cookie, "Authorization": scheme},
        )
        assert answer.status_code == 401, (scheme, answer.text)
    assert alice.get("/v1/vault").json()["credentials"] == []


# --- IdP tokens as Bearer ----------------------------------------------------------------------


def test_an_idp_bearer_token_must_be_typed_at_jwt(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    assert bearer(
        hostile_leash, hostile_idp.mint_access_token("sub-z", DEFAULT_AUDIENCE)
    ).is_success
    for typ in ("JWT", "", "id_token+jwt"):
        token = hostile_idp.mint_access_token("sub-z", DEFAULT_AUDIENCE, typ=typ)
        assert bearer(hostile_leash, token).status_code == 401, typ


def test_an_idp_bearer_token_with_crit_is_refused(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    header = {"alg": "RS256", "typ": "at+jwt", "kid": hostile_idp.key.kid}
    token = rs256(hostile_idp, {**header, "crit": ["b64x"], "b64x": 1}, access_claims(hostile_idp))
    assert bearer(hostile_leash, token).status_code == 401


def test_idp_bearer_header_tricks_are_refused_without_fetching(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.settimeout(0.5)
    url = f"http://127.0.0.1:{trap.getsockname()[1]}/jwks"
    claims = access_claims(hostile_idp)
    kid = hostile_idp.key.kid
    base = {"alg": "RS256", "typ": "at+jwt"}
    for header in (
        {**base, "kid": kid, "jku": url},
        {**base, "kid": kid, "x5u": url},
        {**base, "kid": "../../../../etc/passwd"},
        {**base, "kid": "x' OR '1'='1"},
        {**base, "kid": "k" * 4096},
    ):
        answer = bearer(hostile_leash, rs256(hostile_idp, header, claims))
        if "jku" not in header and "x5u" not in header:
            assert answer.status_code == 401, header
    try:
        connection, _ = trap.accept()
        connection.close()
        fetched = True
    except TimeoutError:
        fetched = False
    finally:
        trap.close()
    assert not fetched, "Leash fetched a key from a URL named in a token header"


def test_hs256_keyed_with_the_idps_public_material_is_refused(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    claims = access_claims(hostile_idp)
    jwk = hostile_idp.key.public_jwk()
    pem = hostile_idp.key.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    keys = [pem, json.dumps(jwk).encode(), jwk["n"].encode(), hostile_idp.client_secret.encode()]
    for key in keys:
        token = sign(claims, "HS256", key, jwk["kid"], "at+jwt")
        assert bearer(hostile_leash, token).status_code == 401
    for alg in ("none", "None", "NONE"):
        header = b64url(json.dumps({"alg": alg, "typ": "at+jwt"}).encode())
        token = header + "." + b64url(json.dumps(claims).encode()) + "."
        assert bearer(hostile_leash, token).status_code == 401, alg


@pytest.mark.parametrize(
    "extra",
    [
        {"exp": "9999999999"},
        {"exp": 9999999999.5},
        {"exp": True},
        {"exp": None},
        {"nbf": 9999999999},
        {"nbf": "0"},
        {"iss": "{iss}/"},
        {"sub": ""},
        {"sub": 7},
        {"aud": "https://leash.test/api/"},
        {"aud": ["https://LEASH.test/api"]},
    ],
)
def test_idp_bearer_claims_of_the_wrong_type_or_value_are_refused(
    hostile_leash: Leash, hostile_idp: HostileIdp, extra: dict[str, Any]
) -> None:
    claims = {
        **access_claims(hostile_idp),
        **{
            k: (v.format(iss=hostile_idp.issuer) if isinstance(v, str) else v)
            for k, v in extra.items()
        },
    }
    header = {"alg": "RS256", "typ": "at+jwt", "kid": hostile_idp.key.kid}
    assert bearer(hostile_leash, rs256(hostile_idp, header, claims)).status_code == 401


def test_idp_bearer_groups_of_the_wrong_shape_never_make_an_admin(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    for n, groups in enumerate(("leash-admins", [["leash-admins"]], "staff,leash-admins")):
        token = hostile_idp.mint_access_token(
            f"sub-shape-{n}", DEFAULT_AUDIENCE, extra={"groups": groups}
        )
        answer = bearer(hostile_leash, token)
        assert answer.status_code in (200, 401), answer.text
        if answer.status_code == 200:
            assert answer.json()["admin"] is False


def test_an_idp_token_at_the_gateway_is_never_forwarded_nor_delegated(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    """API §6 lets a human call the gateway directly with their own Bearer: an IdP token acts
    at most in `direct` mode, and never reaches the upstream (ATTACKS 36)."""
    token = hostile_idp.mint_access_token("sub-gw", DEFAULT_AUDIENCE)
    before = len(hostile_leash.upstream.seen())
    answer = fresh(hostile_leash).get(
        "/gw/mail/messages/idp-token", headers={"Authorization": f"Bearer {token}"}
    )
    forwarded = [r for r in hostile_leash.upstream.seen()[before:] if "idp-token" in r.path]
    for request in forwarded:
        assert token not in json.dumps(request.headers)
        assert "authorization" not in request.headers
    audit = hostile_leash.call("GET", "/v1/audit", hostile_leash.admin_key).text
    if answer.status_code == 200:
        events = [json.loads(line) for line in audit.splitlines() if "idp-token" in line]
        assert events
        assert all(e.get("mode") == "direct" for e in events), events
    assert token not in audit
    # An IdP token at the token endpoint is no agent credential.
    exchange = fresh(hostile_leash).post(
        "/oauth/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        },
        headers={"Authorization": f"Bearer {token}"},
    )
    assert exchange.status_code in (400, 401, 404)
    assert "access_token" not in exchange.text


# --- secrets in answers, audit and logs ---------------------------------------------------------


def test_no_login_secret_reaches_an_answer_the_audit_or_the_log(
    make_leash: MakeLeash, idp: Idp
) -> None:
    leash = leash_for(make_leash, idp)
    client = browser(leash)
    authorize = start(client)
    login_cookie = client.cookies.get("leash_login")
    back = login_over_http(client, authorize, "alice", idp.password("alice"))
    code = dict(httpx.URL(back.headers["location"]).params)["code"]
    done = client.get(back.headers["location"])
    assert done.status_code == 303
    session = session_cookie(client)
    saved = client.put(
        "/v1/vault/mail",
        json={"kind": "bearer", "secret": "vaulted-s3cret-xyz"},
        headers=origin(leash),
    )
    assert saved.is_success, saved.text
    answers = [
        me(client).text,
        client.get("/v1/vault").text,
        leash.call("GET", "/v1/users", leash.admin_key).text,
    ]
    audit = leash.call("GET", "/v1/audit", leash.admin_key).text
    log = "".join(leash.output)
    secrets_ = {
        "client secret": idp.client_secret,
        "session id": session,
        "login cookie": login_cookie,
        "code": code,
        "vaulted secret": "vaulted-s3cret-xyz",
    }
    for name, value in secrets_.items():
        assert value
        for where, text in (("answers", "".join(answers)), ("audit", audit), ("log", log)):
            assert value not in text, f"{name} in {where}"


# --- the console (ATTACKS 53) -------------------------------------------------------------------

PAYLOAD = '"><img src=x onerror="window.__pwned=1;alert(1)"><script>window.__pwned=2</script>'


@pytest.fixture
def hostile_approval(
    make_leash: MakeLeash, idp: Idp, tmp_path: Path
) -> Iterator[tuple[Leash, dict[str, Any]]]:
    """Alice's grant with a hostile purpose; its agent's hostile send waits for her approval."""
    leash = leash_for(make_leash, idp)
    alice = sign_in(leash, idp, "alice")
    agent_id, key_file = agent_for(leash, tmp_path)
    body = {
        "agent": agent_id,
        "purpose": f"Purpose {PAYLOAD}",
        "upstreams": ["mail"],
        "actions": ["mail:read", "mail:send"],
        "approval_required": ["mail:send"],
        "ttl_seconds": 900,
    }
    created = alice.post("/v1/grants", json=body, headers=origin(leash))
    assert created.status_code == 201, created.text
    grant: dict[str, Any] = created.json()

    def send() -> None:
        try:
            with Agent.from_jwk_file(leash.url, agent_id, key_file) as agent:
                task = agent.task(grant["handle"], approval_timeout=25)
                segment = "%3Cimg%20src%3Dx%20onerror%3Dalert(3)%3E"
                url = task.url("mail", f"/messages/{segment}/send?q={PAYLOAD}")
                with httpx.Client(timeout=30) as http:
                    http.post(
                        url,
                        content=f"<html><body>{PAYLOAD}</body></html>".encode(),
                        headers={"Content-Type": "text/html", "X-Note": PAYLOAD},
                        auth=task.auth,
                    )
        except Exception:  # the approval times out when the test ends
            return

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    for _ in range(100):
        pending = alice.get("/v1/approvals", params={"status": "pending"}).json()["approvals"]
        if pending:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no approval appeared")
    yield leash, pending[0]
    alice.post(f"/v1/approvals/{pending[0]['id']}/deny", headers=origin(leash))
    thread.join(timeout=30)


def watch(page: Page) -> tuple[list[str], list[str]]:
    """The messages of the dialogs that `page` opens (each dismissed) and of its console (where
    chromium reports CSP violations)."""
    dialogs: list[str] = []
    console: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    def on_console(message: ConsoleMessage) -> None:
        console.append(message.text)

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    return dialogs, console


def browser_login(page: Page, leash: Leash, idp: Idp, username: str) -> None:
    page.goto(f"{leash.url}/login")
    page.fill("#username", username)
    page.fill("#password", idp.password(username))
    page.click("#submit")
    page.wait_for_url(f"{leash.url}/console**")


def test_hostile_agent_text_is_shown_as_text_in_the_console(
    hostile_approval: tuple[Leash, dict[str, Any]], idp: Idp, browser_page: Page
) -> None:
    leash, approval = hostile_approval
    page = browser_page
    dialogs, console = watch(page)
    browser_login(page, leash, idp, "alice")
    for hash_route in ("#/inbox", "#/tasks", "#/audit", "#/review"):
        page.goto(f"{leash.url}/console{hash_route}")
        page.wait_for_timeout(1500)
        if hash_route == "#/inbox":
            text = page.inner_text("main")
            assert "onerror" in text, text  # the payload is there, as text
            assert page.locator("main img").count() == 0
            for button in page.locator("main button").all():
                label = button.inner_text()
                if "body" in label.lower() or "show" in label.lower():
                    button.click()
            page.wait_for_timeout(1000)
        assert page.evaluate("window.__pwned") is None, hash_route
        assert page.locator("main script").count() == 0
    assert dialogs == []
    assert not [m for m in console if "Content Security Policy" in m], console
    # The approval is still pending: nothing on the page approved it.
    status = leash.call("GET", f"/v1/approvals/{approval['id']}", leash.admin_key).json()
    assert status["status"] == "pending"


def test_the_body_preview_cannot_render_on_leashs_origin(
    hostile_approval: tuple[Leash, dict[str, Any]], idp: Idp, browser_page: Page
) -> None:
    leash, approval = hostile_approval
    answer = leash.call("GET", f"/v1/approvals/{approval['id']}/body", leash.admin_key)
    assert answer.status_code == 200, answer.text
    assert PAYLOAD.encode() in answer.content
    assert answer.headers["content-type"].startswith("application/octet-stream")
    assert answer.headers["content-disposition"].startswith("attachment")
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in answer.headers["content-security-policy"]
    # In the browser, opening it downloads it: no document of Leash's origin runs it.
    page = browser_page
    dialogs, _ = watch(page)
    browser_login(page, leash, idp, "alice")
    # chromium reports the navigation as a download, an error to `goto`.
    with page.expect_download(), contextlib.suppress(Exception):
        page.goto(f"{leash.url}/v1/approvals/{approval['id']}/body")
    assert dialogs == []
    assert page.evaluate("window.__pwned") is None


def test_every_console_and_api_answer_refuses_framing(hostile_leash: Leash) -> None:
    client, done = hostile_login(hostile_leash)
    assert done.status_code == 303
    for path in ("/console", "/console/", "/console/assets/app.js", "/console/nope", "/v1/me"):
        answer = client.get(path)
        if answer.headers.get("content-type", "").startswith("text/html"):
            csp = answer.headers.get("content-security-policy", "")
            assert "frame-ancestors 'none'" in csp, path
            assert "script-src 'self'" in csp, path
    for path in ("/login", "/auth/callback", "/nope"):
        answer = fresh(hostile_leash).get(path)
        assert not answer.headers.get("content-type", "").startswith("text/html"), path


# --- more login checks (RFC 9207, code injection, cookie names) ---------------------------------


def test_a_callback_without_iss_is_refused_when_the_idp_sends_it(hostile_leash: Leash) -> None:
    client = fresh(hostile_leash)
    back = client.get(start(client))
    query = dict(httpx.URL(back.headers["location"]).params)
    query.pop("iss")
    refused = client.get("/auth/callback", params=query)
    assert refused.status_code == 400, refused.text
    assert session_cookie(client) is None


def test_a_code_from_another_login_is_refused_in_the_victims_callback(
    hostile_leash: Leash, hostile_idp: HostileIdp
) -> None:
    """Code injection: the attacker's fresh code with the victim's own state and login cookie
    fails PKCE at the IdP, so the victim is never logged in as the attacker."""
    attacker = fresh(hostile_leash)
    attacker_back = attacker.get(start(attacker))
    code = dict(httpx.URL(attacker_back.headers["location"]).params)["code"]
    victim = fresh(hostile_leash)
    state = dict(httpx.URL(start(victim)).params)["state"]
    refused = victim.get(
        "/auth/callback", params={"code": code, "state": state, "iss": hostile_idp.issuer}
    )
    assert refused.status_code == 400, refused.text
    assert session_cookie(victim) is None


def test_the_login_cookie_is_short_lived_and_http_only(hostile_leash: Leash) -> None:
    answer = fresh(hostile_leash).get("/login")
    [cookie] = [c for c in answer.headers.get_list("set-cookie") if c.startswith("leash_login=")]
    attributes = [part.strip() for part in cookie.split(";")]
    assert "HttpOnly" in attributes
    assert "SameSite=Lax" in attributes or "SameSite=Strict" in attributes
    max_age = [int(a.split("=")[1]) for a in attributes if a.startswith("Max-Age=")]
    assert max_age
    assert 0 < max_age[0] <= 900
    assert answer.headers.get("cache-control") == "no-store"


def test_on_https_only_host_prefixed_secure_cookies_count(
    make_leash: MakeLeash, hostile_idp: HostileIdp
) -> None:
    leash = make_leash(
        f'public_url = "https://leash.example"\n{oidc_section(hostile_idp.issuer)}',
        {SECRET_ENV: hostile_idp.client_secret},
    )
    started = fresh(leash).get("/login")
    [login] = started.headers.get_list("set-cookie")
    assert login.startswith("__Host-leash_login=")
    assert "Secure" in login
    assert "Path=/" in login
    assert "Domain" not in login
    back = fresh(leash).get(started.headers["location"])
    callback = httpx.URL(back.headers["location"])
    assert callback.host == "leash.example"
    done = fresh(leash).get(
        f"/auth/callback?{callback.query.decode()}", headers={"Cookie": login.split(";")[0]}
    )
    assert done.status_code == 303, done.text
    session = next(
        c for c in done.headers.get_list("set-cookie") if c.startswith("__Host-leash_session=")
    )
    assert "Secure" in session
    assert "HttpOnly" in session
    assert "Domain" not in session
    value = session.split(";")[0].split("=", 1)[1]
    assert (
        fresh(leash).get("/v1/me", headers={"Cookie": f"__Host-leash_session={value}"}).is_success
    )
    # The unprefixed name (which a sibling host could toss) is no session on https.
    plain = fresh(leash).get("/v1/me", headers={"Cookie": f"leash_session={value}"})
    assert plain.status_code == 401


def test_an_approval_is_never_decided_by_a_cookie_get_or_a_null_origin(
    hostile_approval: tuple[Leash, dict[str, Any]], idp: Idp
) -> None:
    leash, approval = hostile_approval
    alice = sign_in(leash, idp, "alice")
    for decision in ("approve", "deny"):
        path = f"/v1/approvals/{approval['id']}/{decision}"
        for method in ("GET", "HEAD", "OPTIONS", "PUT", "PATCH"):
            alice.request(method, path, headers=origin(leash))
        for header in ("null", f"{leash.url}/", "https://evil.example"):
            answer = alice.post(path, headers={"Origin": header})
            assert answer.status_code == 403, (header, answer.text)
        # A form-encoded cross-site POST (what a page elsewhere can send without a preflight).
        answer = alice.post(
            path,
            content=b"decision=approve",
            headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": "null"},
        )
        assert answer.status_code == 403
    status = leash.call("GET", f"/v1/approvals/{approval['id']}", leash.admin_key).json()
    assert status["status"] == "pending"


def test_session_and_login_cookie_values_are_no_other_credential(
    leash_idp_alice: tuple[Leash, httpx.Client],
) -> None:
    leash, alice = leash_idp_alice
    session = session_cookie(alice)
    assert session
    login_value = fresh(leash).get("/login").headers["set-cookie"].split(";")[0].split("=", 1)[1]
    bearer_session = {"Authorization": f"Bearer {session}"}
    assert fresh(leash).get("/v1/me", headers=bearer_session).status_code == 401
    gateway = fresh(leash).get("/gw/mail/messages/by-session-id", headers=bearer_session)
    assert gateway.status_code == 401
    assert not [r for r in leash.upstream.seen() if "by-session-id" in r.path]
    as_session = {"Cookie": f"leash_session={login_value}"}
    assert fresh(leash).get("/v1/me", headers=as_session).status_code == 401
    # The session cookie together with a human's direct Bearer: the gateway never mixes them.
    key = leash.add_user("dora")
    mixed = fresh(leash).get(
        "/gw/mail/messages/mixed",
        headers={"Authorization": f"Bearer {key}", "Cookie": f"leash_session={session}"},
    )
    for request in [r for r in leash.upstream.seen() if r.path.endswith("/mixed")]:
        assert "cookie" not in request.headers
        assert session not in json.dumps(request.headers)
    assert mixed.status_code in (200, 401, 403)


def test_no_login_secret_reaches_a_debug_log(make_leash: MakeLeash, idp: Idp) -> None:
    leash = make_leash(
        oidc_section(idp.issuer), {SECRET_ENV: idp.client_secret, "LEASH_LOG": "debug"}
    )
    idp.set_redirect_uri(f"{leash.url}/auth/callback")
    client = browser(leash)
    authorize = start(client)
    login_cookie = client.cookies.get("leash_login")
    back = login_over_http(client, authorize, "alice", idp.password("alice"))
    code = dict(httpx.URL(back.headers["location"]).params)["code"]
    assert client.get(back.headers["location"]).status_code == 303
    token = idp.access_token("alice")
    assert fresh(leash).get("/v1/me", headers={"Authorization": f"Bearer {token}"}).is_success
    client.post("/logout", headers=origin(leash))
    time.sleep(0.3)
    log = "".join(leash.output)
    for name, value in {
        "client secret": idp.client_secret,
        "login cookie": login_cookie,
        "code": code,
        "IdP access token": token,
        "IdP token signature": token.rsplit(".", 1)[1],
    }.items():
        assert value
        assert value not in log, name


def test_an_idp_controlled_name_is_shown_as_text_to_the_admin(
    make_leash: MakeLeash, hostile_idp: HostileIdp, browser_page: Page
) -> None:
    """A person who controls their own profile at the IdP (email, preferred_username) picks an
    HTML name; the admin's console lists users, grants and the audit with it."""
    leash = make_leash(oidc_section(hostile_idp.issuer), {SECRET_ENV: hostile_idp.client_secret})
    hostile_idp.claims.update(
        {"sub": "sub-html", "email": f"m{PAYLOAD}@example.com", "preferred_username": PAYLOAD}
    )
    client, done = hostile_login(leash)
    assert done.status_code == 303, done.text
    name = me(client).json()["name"]
    hostile_idp.claims.update(
        {
            "sub": "sub-admin",
            "email": "admin@example.com",
            "preferred_username": "admin",
            "groups": ["leash-admins"],
        }
    )
    page = browser_page
    dialogs, console = watch(page)
    page.goto(f"{leash.url}/login")
    page.wait_for_url(f"{leash.url}/console**")
    for hash_route in ("#/admin/users", "#/admin/grants", "#/audit"):
        page.goto(f"{leash.url}/console{hash_route}")
        page.wait_for_timeout(1200)
        if hash_route == "#/admin/users":
            assert "onerror" in page.inner_text("main"), name
        assert page.locator("main img").count() == 0
        assert page.evaluate("window.__pwned") is None, hash_route
    assert dialogs == []
    assert not [m for m in console if "Content Security Policy" in m], console


def test_hostile_mcp_tool_arguments_are_shown_as_text_in_the_inbox(
    make_leash: MakeLeash, idp: Idp, tmp_path: Path, browser_page: Page
) -> None:
    import asyncio

    from mcp_fixtures import mcp_session, start_crm
    from test_mcp import CRM_TOOLS

    with start_crm() as crm:
        leash = make_leash(
            f"{CRM_TOOLS.format(url=crm.url, wait=20)}\n{oidc_section(idp.issuer)}",
            {SECRET_ENV: idp.client_secret},
        )
        idp.set_redirect_uri(f"{leash.url}/auth/callback")
        alice = sign_in(leash, idp, "alice")
        agent_id, key_file = agent_for(leash, tmp_path)
        body = {
            "agent": agent_id,
            "purpose": "Pay the invoice",
            "upstreams": ["crm"],
            "actions": ["crm:pay"],
            "approval_required": ["crm:pay"],
            "ttl_seconds": 900,
        }
        created = alice.post("/v1/grants", json=body, headers=origin(leash))
        assert created.status_code == 201, created.text
        handle = created.json()["handle"]

        async def pay() -> None:
            with Agent.from_jwk_file(leash.url, agent_id, key_file) as agent:
                task = agent.task(handle)
                async with mcp_session(f"{leash.url}/mcp/crm", task.auth) as mcp:
                    await mcp.call_tool("pay", {"to": PAYLOAD, "amount": 1})

        def run() -> None:
            with contextlib.suppress(BaseException):
                asyncio.run(pay())

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for _ in range(150):
            listed = alice.get("/v1/approvals", params={"status": "pending"}).json()
            if listed["approvals"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the tool call never reached the inbox")
        [approval] = listed["approvals"]
        page = browser_page
        dialogs, console = watch(page)
        browser_login(page, leash, idp, "alice")
        page.goto(f"{leash.url}/console#/inbox")
        page.wait_for_timeout(1500)
        assert "onerror" in page.inner_text("main")
        assert page.locator("main img").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert dialogs == []
        assert not [m for m in console if "Content Security Policy" in m], console
        alice.post(f"/v1/approvals/{approval['id']}/deny", headers=origin(leash))
        thread.join(timeout=30)
        assert [c for c in crm.calls() if c["tool"] == "pay"] == []


def test_session_ids_and_login_secrets_are_not_stored_in_clear(
    make_leash: MakeLeash, idp: Idp
) -> None:
    leash = leash_for(make_leash, idp)
    client = browser(leash)
    authorize = start(client)
    login_cookie = client.cookies.get("leash_login")
    back = login_over_http(client, authorize, "alice", idp.password("alice"))
    assert client.get(back.headers["location"]).status_code == 303
    session = session_cookie(client)
    assert session
    assert login_cookie
    stored = b"".join(
        path.read_bytes() for path in (leash.dir / "data").rglob("*") if path.is_file()
    )
    assert stored, "no store found"
    for name, value in {
        "session id": session,
        "login cookie": login_cookie,
        "client secret": idp.client_secret,
    }.items():
        assert value.encode() not in stored, name


def test_activity_never_stretches_a_session_past_its_absolute_end(
    make_leash: MakeLeash, hostile_idp: HostileIdp
) -> None:
    leash = make_leash(
        oidc_section(hostile_idp.issuer, "session_ttl = 2\nsession_idle = 60"),
        {SECRET_ENV: hostile_idp.client_secret},
    )
    client, done = hostile_login(leash)
    assert done.status_code == 303
    started = time.monotonic()
    while time.monotonic() - started < 1.2:
        assert me(client).status_code == 200
        time.sleep(0.3)
    time.sleep(max(0.0, 2.4 - (time.monotonic() - started)))
    assert me(client).status_code == 401
    # A new login is a new session, not the old one revived.
    again, done = hostile_login(leash)
    assert done.status_code == 303
    assert session_cookie(again) != session_cookie(client)


def test_no_cors_grant_on_a_decision_preflight(
    hostile_approval: tuple[Leash, dict[str, Any]],
) -> None:
    leash, approval = hostile_approval
    for path in (f"/v1/approvals/{approval['id']}/approve", "/logout", "/v1/vault/mail"):
        answer = fresh(leash).options(
            path,
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert "access-control-allow-origin" not in answer.headers, path
        assert "access-control-allow-credentials" not in answer.headers, path
