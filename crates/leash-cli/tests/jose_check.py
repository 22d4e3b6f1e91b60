"""Checks a Leash access token with an independent JOSE library (PyJWT + cryptography).

Usage: jose_check.py JWKS_FILE TOKEN ISSUER EXPECTED_JSON
Prints "ok" and exits 0 when the token verifies against the JWKS and carries the expected claims.
"""

import json
import sys

import jwt


def main() -> int:
    jwks_path, token, issuer, expected_json = sys.argv[1:5]
    with open(jwks_path, encoding="utf-8") as f:
        jwks = json.load(f)
    expected = json.loads(expected_json)

    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA", header
    assert header["typ"] == "at+jwt", header
    keys = {k["kid"]: k for k in jwks["keys"]}
    jwk = keys[header["kid"]]
    assert jwk["use"] == "sig" and jwk["alg"] == "EdDSA", jwk
    key = jwt.PyJWK(jwk).key

    claims = jwt.decode(
        token,
        key,
        algorithms=["EdDSA"],
        audience=issuer,
        issuer=issuer,
        options={"require": ["exp", "iat", "iss", "sub", "aud", "jti"]},
    )
    for name in ("sub", "client_id", "grant_id"):
        assert claims[name] == expected[name], (name, claims[name], expected[name])
    assert claims["act"] == {"sub": expected["agent"]}, claims["act"]
    assert claims["cnf"] == {"jkt": expected["jkt"]}, claims["cnf"]
    assert isinstance(claims["exp"], int) and claims["exp"] > claims["iat"], claims

    # A tampered token must not verify.
    head, body, sig = token.split(".")
    tampered = f"{head}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    try:
        jwt.decode(tampered, key, algorithms=["EdDSA"], audience=issuer, issuer=issuer)
    except jwt.InvalidSignatureError:
        pass
    else:
        raise AssertionError("tampered token verified")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
