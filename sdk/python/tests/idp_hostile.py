"""An OpenID Provider that plays its part badly on purpose, for the refusals of Leash's OIDC login
and of Bearer tokens from an IdP: `hostile_idp` (fixture) yields a `HostileIdp` on loopback.

It serves discovery, `/jwks` (one RS256 key, with its `kid`), `/authorize` (no login: straight
back to the `redirect_uri` with a fresh `code`, the `state` and the RFC 9207 `iss`, remembering
the `nonce` and the PKCE challenge) and `/token` (client_secret_basic or client_secret_post; the
PKCE verifier checked against the challenge, each code once, then an ID token of `claims`). Its
`mode`, which a test sets, decides what the ID token gets wrong (`MODES`).
`mint_access_token` makes Bearer tokens (`typ` at+jwt) for the Bearer tests.

Also here: `jwt_parts` (decode without verifying) and `verify_jwt` (RS256 against a JWKS)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# What the ID token gets wrong in each mode.
MODES = (
    "good",  # nothing
    "wrong_nonce",  # `nonce` is not the one of the authorization request
    "wrong_iss",  # `iss` is another issuer
    "wrong_aud",  # `aud` is another client
    "expired",  # `exp` 10 minutes ago
    "other_key",  # signed by a key not in the JWKS (its header names the JWKS key's `kid`)
    "unknown_kid",  # signed by a key not in the JWKS, whose `kid` the JWKS does not have
    "alg_none",  # `alg: none`, no signature
    "missing_nonce",  # no `nonce`
    "hs256_with_client_secret",  # HS256 with the client secret as the key (not in discovery)
)
Mode = Literal[
    "good",
    "wrong_nonce",
    "wrong_iss",
    "wrong_aud",
    "expired",
    "other_key",
    "unknown_kid",
    "alg_none",
    "missing_nonce",
    "hs256_with_client_secret",
]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and the claims of a JWS, not verified."""
    header, claims, _ = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


def verify_jwt(token: str, jwks: Mapping[str, Any]) -> dict[str, Any]:
    """The claims of an RS256 JWS whose signature a key of `jwks` (found by `kid`) verifies;
    raises `ValueError` otherwise. Checks nothing else: not `exp`, not `iss`, not `aud`."""
    header, claims = jwt_parts(token)
    if header.get("alg") != "RS256":
        raise ValueError(f"alg {header.get('alg')!r} is not RS256")
    keys = [key for key in jwks["keys"] if key.get("kid") == header.get("kid")]
    if len(keys) != 1:
        raise ValueError(f"no key {header.get('kid')!r} in the JWKS")
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(b64url_decode(keys[0]["e"]), "big"),
        int.from_bytes(b64url_decode(keys[0]["n"]), "big"),
    )
    signing_input, _, signature = token.rpartition(".")
    try:
        numbers.public_key().verify(
            b64url_decode(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        raise ValueError("bad signature") from None
    return claims


@dataclass
class SigningKey:
    kid: str
    key: rsa.RSAPrivateKey

    @staticmethod
    def generate() -> SigningKey:
        return SigningKey(secrets.token_hex(8), rsa.generate_private_key(65537, 2048))

    def public_jwk(self) -> dict[str, str]:
        numbers = self.key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
        }


def sign(
    claims: Mapping[str, Any],
    alg: str,
    key: SigningKey | bytes | None,
    kid: str | None,
    typ: str = "JWT",
) -> str:
    """A JWS of `claims`: RS256 with an RSA key, HS256 with a secret, or `none`."""
    header: dict[str, Any] = {"alg": alg, "typ": typ}
    if kid is not None:
        header["kid"] = kid
    signing_input = (
        b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(dict(claims)).encode())
    )
    if alg == "RS256" and isinstance(key, SigningKey):
        signature = key.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    elif alg == "HS256" and isinstance(key, bytes):
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    elif alg == "none":
        signature = b""
    else:
        raise ValueError(f"cannot sign {alg} with {type(key).__name__}")
    return signing_input + "." + b64url(signature)


@dataclass
class Pending:
    """A code handed out by `/authorize` and what it was issued for."""

    client_id: str
    redirect_uri: str
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    used: bool = False


@dataclass
class HostileIdp:
    """The hostile IdP: `issuer` is its URL (discovery at
    `<issuer>/.well-known/openid-configuration`); Leash's client is `client_id`/`client_secret`;
    `claims` are the person's in every ID token (`sub`, `email`, `preferred_username`,
    `groups`); `mode` is what the next ID tokens get wrong. `token_requests` holds every form
    posted to `/token`, and `authorize_requests` every `/authorize` query."""

    issuer: str = ""
    client_id: str = "leash"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    mode: Mode = "good"
    claims: dict[str, Any] = field(
        default_factory=lambda: {
            "sub": "hostile-sub-alice",
            "email": "alice@example.com",
            "preferred_username": "alice",
            "groups": ["staff"],
        }
    )
    key: SigningKey = field(default_factory=SigningKey.generate)
    other_key: SigningKey = field(default_factory=SigningKey.generate)
    codes: dict[str, Pending] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": ["openid", "email", "profile", "groups"],
            "authorization_response_iss_parameter_supported": True,
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.public_jwk()]}

    def id_token(self, nonce: str | None, mode: Mode | None = None) -> str:
        """An ID token for Leash's client as `mode` (default: `self.mode`) makes it."""
        mode = mode or self.mode
        now = int(time.time())
        claims: dict[str, Any] = {
            **self.claims,
            "iss": self.issuer,
            "aud": self.client_id,
            "iat": now,
            "exp": now + 300,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        if mode == "wrong_nonce":
            claims["nonce"] = secrets.token_urlsafe(16)
        elif mode == "wrong_iss":
            claims["iss"] = "https://idp.attacker.example"
        elif mode == "wrong_aud":
            claims["aud"] = "someone-else"
        elif mode == "expired":
            claims["iat"], claims["exp"] = now - 1200, now - 600
        elif mode == "missing_nonce":
            claims.pop("nonce", None)
        if mode == "other_key":
            return sign(claims, "RS256", self.other_key, self.key.kid)
        if mode == "unknown_kid":
            return sign(claims, "RS256", self.other_key, self.other_key.kid)
        if mode == "alg_none":
            return sign(claims, "none", None, None)
        if mode == "hs256_with_client_secret":
            return sign(claims, "HS256", self.client_secret.encode(), None)
        return sign(claims, "RS256", self.key, self.key.kid)

    def mint_access_token(
        self,
        sub: str,
        aud: str | list[str],
        groups: list[str] | None = None,
        iss: str | None = None,
        exp: int | None = None,
        key: Literal["good", "other"] = "good",
        *,
        typ: str = "at+jwt",
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """An RS256 access token (RFC 9068) of this IdP (or `iss`) for `aud`, expiring at `exp`
        (default: in 5 minutes), signed by the JWKS key or, with `key="other"`, by a key not in
        the JWKS (with the JWKS key's `kid`). `extra` adds or overrides claims."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": iss or self.issuer,
            "sub": sub,
            "aud": aud,
            "iat": now,
            "exp": now + 300 if exp is None else exp,
            "jti": secrets.token_hex(8),
            "client_id": self.client_id,
            "groups": groups or [],
            **(extra or {}),
        }
        signer = self.key if key == "good" else self.other_key
        return sign(claims, "RS256", signer, self.key.kid, typ)

    def authorize(self, query: Mapping[str, str]) -> str:
        """Where `/authorize` sends the browser: back to `redirect_uri` with a fresh code."""
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.authorize_requests.append(dict(query))
            self.codes[code] = Pending(
                query.get("client_id", ""),
                query["redirect_uri"],
                query.get("nonce"),
                query.get("code_challenge"),
                query.get("code_challenge_method"),
            )
        answer = {"code": code, "iss": self.issuer}
        if "state" in query:
            answer["state"] = query["state"]
        separator = "&" if "?" in query["redirect_uri"] else "?"
        return query["redirect_uri"] + separator + urlencode(answer)

    def token(self, form: Mapping[str, str], authorization: str | None) -> tuple[int, Any]:
        """`/token`'s status and JSON answer."""
        with self.lock:
            self.token_requests.append(dict(form))
            client_id, client_secret = form.get("client_id"), form.get("client_secret")
            if authorization and authorization.lower().startswith("basic "):
                decoded = base64.b64decode(authorization[6:]).decode()
                client_id, _, client_secret = decoded.partition(":")
            if client_id != self.client_id or not hmac.compare_digest(
                (client_secret or "").encode(), self.client_secret.encode()
            ):
                return 401, {"error": "invalid_client"}
            if form.get("grant_type") != "authorization_code":
                return 400, {"error": "unsupported_grant_type"}
            pending = self.codes.get(form.get("code", ""))
            if pending is None or pending.used:
                return 400, {"error": "invalid_grant", "error_description": "unknown or used code"}
            pending.used = True
            if pending.client_id != client_id or pending.redirect_uri != form.get("redirect_uri"):
                return 400, {"error": "invalid_grant", "error_description": "not this client's"}
            verifier = form.get("code_verifier", "")
            challenge = b64url(hashlib.sha256(verifier.encode()).digest())
            if pending.code_challenge_method != "S256" or not hmac.compare_digest(
                challenge, pending.code_challenge or ""
            ):
                return 400, {"error": "invalid_grant", "error_description": "PKCE check failed"}
            nonce = pending.nonce
        return 200, {
            "access_token": secrets.token_urlsafe(24),
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": self.id_token(nonce),
        }


def start_hostile_idp(client_id: str = "leash") -> tuple[HostileIdp, ThreadingHTTPServer]:
    idp = HostileIdp(client_id=client_id)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def answer(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
            payload = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if body is not None:
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {name: values[0] for name, values in parse_qs(url.query).items()}
            if url.path == "/.well-known/openid-configuration":
                self.answer(200, idp.discovery())
            elif url.path == "/jwks":
                self.answer(200, idp.jwks())
            elif url.path == "/authorize" and "redirect_uri" in query:
                self.answer(302, None, {"Location": idp.authorize(query)})
            else:
                self.answer(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            if urlsplit(self.path).path != "/token":
                self.answer(404, {"error": "not_found"})
                return
            form = {name: values[0] for name, values in parse_qs(body).items()}
            status, answer = idp.token(form, self.headers.get("Authorization"))
            self.answer(status, answer)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    idp.issuer = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return idp, server


@pytest.fixture
def hostile_idp() -> Iterator[HostileIdp]:
    """A hostile IdP of the test's own, in mode `good` until the test sets `mode`."""
    idp, server = start_hostile_idp()
    yield idp
    server.shutdown()
    server.server_close()
