"""The JOSE an agent speaks: its key (as `leash agent keygen` writes it), client assertions
(RFC 7523) and DPoP proofs (RFC 9449).

Hand-written over `cryptography` rather than a JOSE library: the SDK signs three fixed token
shapes and never verifies one, and the dependencies are to stay `httpx` and `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

#: The JWS algorithms Leash accepts from agents (API §1): EdDSA or its RFC 9864 name Ed25519,
#: and ES256.
ALGORITHMS = ("EdDSA", "Ed25519", "ES256")


class InvalidKey(ValueError):
    """A key file that is not a private Ed25519 or P-256 JWK, or whose parts do not match."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def access_token_hash(token: str) -> str:
    """`ath` (RFC 9449 §4.2): base64url of the SHA-256 of the access token."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def random_id() -> str:
    return secrets.token_urlsafe(18)


class SigningKey:
    """A private Ed25519 or P-256 key and the JWS algorithm it signs with.

    Never shows its private part: `repr()` names the algorithm and the public thumbprint.
    """

    __slots__ = ("_alg", "_key", "_public_jwk", "_thumbprint")

    def __init__(
        self, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey, alg: str
    ) -> None:
        if alg not in ALGORITHMS:
            raise InvalidKey(f"unsupported algorithm {alg!r}; use one of {', '.join(ALGORITHMS)}")
        if isinstance(key, ed25519.Ed25519PrivateKey):
            if alg == "ES256":
                raise InvalidKey("an Ed25519 key signs with EdDSA or Ed25519, not ES256")
            raw = key.public_key().public_bytes_raw()
            public: dict[str, str] = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        else:
            if not isinstance(key.curve, ec.SECP256R1) or alg != "ES256":
                raise InvalidKey("an EC key must be P-256 and sign with ES256")
            numbers = key.public_key().public_numbers()
            public = {
                "kty": "EC",
                "crv": "P-256",
                "x": b64url(numbers.x.to_bytes(32, "big")),
                "y": b64url(numbers.y.to_bytes(32, "big")),
            }
        self._key = key
        self._alg = alg
        self._public_jwk = public
        # RFC 7638: the required members only, in lexicographic order, no whitespace.
        self._thumbprint = b64url(
            hashlib.sha256(_compact_json(dict(sorted(public.items())))).digest()
        )

    @classmethod
    def generate(cls, alg: str = "EdDSA") -> SigningKey:
        """A fresh key for `alg`."""
        if alg == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()), alg)
        return cls(ed25519.Ed25519PrivateKey.generate(), alg)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> SigningKey:
        """Reads a private JWK as `leash agent keygen` writes it (`kty`, `crv`, `x`, [`y`], `d`,
        `alg`); refuses one whose private part does not match its public part."""

        def member(name: str) -> str:
            value = jwk.get(name)
            if not isinstance(value, str):
                raise InvalidKey(f"the private JWK needs `{name}` as a string")
            return value

        def decoded(name: str, length: int) -> bytes:
            try:
                raw = b64url_decode(member(name))
            except ValueError:
                raise InvalidKey(f"`{name}` is not base64url") from None
            if len(raw) != length:
                raise InvalidKey(f"`{name}` must be {length} bytes")
            return raw

        kty, crv = member("kty"), member("crv")
        key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
        if (kty, crv) == ("OKP", "Ed25519"):
            alg = "Ed25519" if jwk.get("alg") == "Ed25519" else "EdDSA"
            key = ed25519.Ed25519PrivateKey.from_private_bytes(decoded("d", 32))
        elif (kty, crv) == ("EC", "P-256"):
            alg = "ES256"
            scalar = int.from_bytes(decoded("d", 32), "big")
            try:
                key = ec.derive_private_key(scalar, ec.SECP256R1())
            except ValueError:
                raise InvalidKey("`d` is not a P-256 private scalar") from None
        else:
            raise InvalidKey("use an OKP/Ed25519 or EC/P-256 key")
        signing = cls(key, alg)
        expected = {name: jwk.get(name) for name in signing._public_jwk}
        if expected != signing._public_jwk:
            raise InvalidKey("the private key does not match its public part")
        return signing

    @property
    def alg(self) -> str:
        return self._alg

    @property
    def thumbprint(self) -> str:
        """The RFC 7638 SHA-256 thumbprint of the public key (a DPoP token's `cnf.jkt`)."""
        return self._thumbprint

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK, with `alg` (what `POST /v1/agents` registers)."""
        return {**self._public_jwk, "alg": self._alg}

    def __repr__(self) -> str:
        return f"SigningKey(alg={self._alg!r}, thumbprint={self._thumbprint!r})"

    def sign(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        """A compact JWS of `claims`; `alg` is added to `header`."""
        signing_input = (
            b64url(_compact_json({**header, "alg": self._alg}))
            + "."
            + b64url(_compact_json(claims))
        ).encode("ascii")
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            signature = self._key.sign(signing_input)
        else:
            r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return signing_input.decode("ascii") + "." + b64url(signature)

    def client_assertion(self, agent_id: str, audience: str, now: int) -> str:
        """A private_key_jwt client assertion (RFC 7523 §3) valid for 60 s from `now`.

        Without `iat` (optional in RFC 7523): Leash allows an assertion's `iat` only 30 s of
        skew ahead, its `exp` up to 5 minutes, and DPoP proofs ±60 s, so an agent whose clock
        runs ahead within the proofs' window would be refused for `iat` alone."""
        claims = {
            "iss": agent_id,
            "sub": agent_id,
            "aud": audience,
            "exp": now + 60,
            "jti": random_id(),
        }
        return self.sign({"typ": "JWT"}, claims)

    def dpop_proof(
        self,
        method: str,
        url: str,
        now: int,
        access_token: str | None = None,
        nonce: str | None = None,
    ) -> str:
        """A DPoP proof for `method` on `url` (query and fragment are not part of `htu`)."""
        htu = url.split("#", 1)[0].split("?", 1)[0]
        claims: dict[str, Any] = {"jti": random_id(), "htm": method, "htu": htu, "iat": now}
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        return self.sign({"typ": "dpop+jwt", "jwk": self._public_jwk}, claims)


def unverified_claims(jwt: str) -> dict[str, Any]:
    """The claims of a JWT the issuer just handed us over its own TLS connection; read, not
    verified (the gateway verifies; the agent only needs `grant_id` and `scope`)."""
    try:
        claims = json.loads(b64url_decode(jwt.split(".")[1]))
    except (IndexError, ValueError):
        raise ValueError("the access token is not a JWT") from None
    if not isinstance(claims, dict):
        raise ValueError("the access token's claims are not an object")
    return claims
