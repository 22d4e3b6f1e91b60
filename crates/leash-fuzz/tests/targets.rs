//! The fuzz targets of issue #8, each a property over generated and mutated inputs: JWT and
//! DPoP parsing and checking, server nonces with any bytes and times (issue #27), the token
//! endpoint's form parsing, route and path matching, the Cedar context built from a request,
//! and the audit verifier on arbitrary files. Each target
//! also replays its regression list (inputs that once failed, or that stand for a class of
//! attack) before fuzzing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code aborts loudly on failure"
)]

use std::collections::{BTreeSet, HashMap};

use leash_core::audit::{AuditEvent, ChainVerifier, Checkpoint, Mode, Outcome};
use leash_core::client::AgentKey;
use leash_core::dpop::{
    AccessTokenHash, NONCE_LIFETIME_SECS, NonceKey, ProofContext, verify_proof,
};
use leash_core::jws::Alg;
use leash_core::route::{RouteTable, safe_segments};
use leash_core::token::{AccessClaims, Actor, Confirmation, SigningKey, verify_access_token};
use leash_fuzz::fuzz;
use leash_policy::{Decision, Facts, PolicyEngine};
use proptest::prelude::*;
use serde_json::{Value, json};

const NOW: i64 = 1_800_000_000;
const ISSUER: &str = "https://leash.example";
const URL: &str = "https://leash.example/gw/mail/messages/1";

/// A change to a valid compact JWS (or any text).
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the character at this position (modulo length).
    Replace(usize, char),
    /// Insert a character.
    Insert(usize, char),
    /// Delete the character.
    Delete(usize),
    /// Cut the text here.
    Truncate(usize),
    /// Swap two dot-separated parts.
    SwapParts(usize, usize),
    /// Replace one dot-separated part with arbitrary text.
    ReplacePart(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let c = prop_oneof![
        proptest::char::range('A', 'z'),
        Just('.'),
        Just('='),
        Just('-'),
        Just('_'),
        any::<char>()
    ];
    prop_oneof![
        (any::<usize>(), c.clone()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<usize>(), c).prop_map(|(i, c)| Mutation::Insert(i, c)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (0..4usize, 0..4usize).prop_map(|(a, b)| Mutation::SwapParts(a, b)),
        (0..4usize, "[A-Za-z0-9_.=-]{0,80}").prop_map(|(i, s)| Mutation::ReplacePart(i, s)),
    ]
}

fn mutate(text: &str, how: &Mutation) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| if chars.is_empty() { 0 } else { i % chars.len() };
    let mut out = chars.clone();
    match how {
        Mutation::Replace(i, c) if !chars.is_empty() => out[at(*i)] = *c,
        Mutation::Insert(i, c) => out.insert(at(*i), *c),
        Mutation::Delete(i) if !chars.is_empty() => {
            out.remove(at(*i));
        }
        Mutation::Truncate(i) => out.truncate(at(*i)),
        Mutation::SwapParts(a, b) => {
            let mut parts: Vec<&str> = text.split('.').collect();
            let n = parts.len();
            parts.swap(a % n, b % n);
            return parts.join(".");
        }
        Mutation::ReplacePart(i, s) => {
            let mut parts: Vec<&str> = text.split('.').collect();
            let n = parts.len();
            parts[i % n] = s;
            return parts.join(".");
        }
        _ => {}
    }
    out.into_iter().collect()
}

fn ed25519_key(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}

fn token_key() -> SigningKey {
    SigningKey::new(ed25519_key(7))
}

fn access_token(key: &SigningKey, jkt: &str) -> String {
    key.sign(&AccessClaims {
        iss: ISSUER.into(),
        sub: "usr_alice".into(),
        aud: ISSUER.into(),
        iat: NOW,
        exp: NOW + 300,
        jti: "tok_1".into(),
        client_id: "spiffe://example.org/agent/mailbot".into(),
        act: Actor {
            sub: "spiffe://example.org/agent/mailbot".into(),
        },
        scope: "mail:read".into(),
        cnf: Confirmation { jkt: jkt.into() },
        grant_id: "grt_1".into(),
        purpose: "Triage".into(),
    })
}

/// Arbitrary JSON values of bounded depth: claims and headers of every type.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (NOW - 120..NOW + 120).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,20}".prop_map(Value::from),
        prop_oneof![
            Just("GET"),
            Just("POST"),
            Just(URL),
            Just("dpop+jwt"),
            Just("EdDSA"),
            Just("ES256"),
            Just("none"),
            Just("HS256")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Proof claims: each member absent, right, or an arbitrary value.
fn proof_claims() -> impl Strategy<Value = Value> {
    let member = |right: Value| {
        prop_oneof![
            2 => Just(Some(right)),
            1 => Just(None),
            1 => json_value().prop_map(Some),
        ]
    };
    (
        member(json!("GET")),
        member(json!(URL)),
        member(json!(NOW)),
        member(json!("a-unique-jti")),
        member(json!("right-ath")),
        proptest::collection::btree_map("[a-z]{1,6}", json_value(), 0..3),
    )
        .prop_map(|(htm, htu, iat, jti, ath, extra)| {
            let mut claims: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (name, value) in [
                ("htm", htm),
                ("htu", htu),
                ("iat", iat),
                ("jti", jti),
                ("ath", ath),
            ] {
                match value {
                    Some(v) => claims.insert(name.into(), v),
                    None => claims.remove(name),
                };
            }
            Value::Object(claims)
        })
}

#[test]
fn jwt_and_dpop_parsing_and_checking() {
    let url = url::Url::parse(URL).unwrap();
    let server = token_key();
    let agent = AgentKey::generate(Alg::EdDsa);
    let token = access_token(&server, &agent.public().thumbprint());
    let valid_proof = agent.dpop_proof("GET", URL, Some(&token), None, NOW);
    let token_hash = AccessTokenHash::of(&token);
    let cx = ProofContext {
        method: "GET",
        url: url.as_str(),
        access_token: Some(&token_hash),
        now: NOW,
        nonces: None,
    };
    let find_key = |kid: &str| (kid == server.kid()).then(|| server.public());
    assert!(verify_proof(&valid_proof, &cx).is_ok());
    assert!(verify_access_token(&token, find_key, ISSUER, NOW).is_ok());

    // Regressions and attack classes: none of these may verify.
    for input in [
        "",
        ".",
        "..",
        "...",
        "a.b.c",
        "eyJhbGciOiJub25lIn0.e30.",
        "eyJhbGciOiJub25lIn0.e30",
        "\u{0}.\u{0}.\u{0}",
    ] {
        assert!(verify_proof(input, &cx).is_err(), "{input:?}");
        assert!(verify_access_token(input, find_key, ISSUER, NOW).is_err());
    }

    // Any text at all: an error, never a panic or a pass.
    fuzz("jose/arbitrary text", ".{0,600}", |text| {
        prop_assert!(verify_proof(&text, &cx).is_err());
        prop_assert!(verify_access_token(&text, find_key, ISSUER, NOW).is_err());
        Ok(())
    });

    // A valid proof and token, changed anywhere: verifies only if unchanged.
    fuzz("jose/mutated proof and token", mutation(), |how| {
        let proof = mutate(&valid_proof, &how);
        if verify_proof(&proof, &cx).is_ok() {
            prop_assert_eq!(&proof, &valid_proof);
        }
        let changed = mutate(&token, &how);
        if verify_access_token(&changed, find_key, ISSUER, NOW).is_ok() {
            prop_assert_eq!(&changed, &token);
        }
        Ok(())
    });

    // Validly signed proofs with arbitrary claims: a proof passes only if every rule holds.
    let ath = token_hash.ath();
    fuzz(
        "jose/signed proofs with arbitrary claims",
        proof_claims(),
        |mut claims| {
            if claims.get("ath") == Some(&json!("right-ath")) {
                claims["ath"] = json!(ath);
            }
            let mut header = serde_json::Map::new();
            header.insert("typ".into(), json!("dpop+jwt"));
            header.insert("jwk".into(), agent.public().to_value());
            let proof = agent.sign(header, &claims);
            if verify_proof(&proof, &cx).is_ok() {
                prop_assert_eq!(&claims["htm"], &json!("GET"));
                prop_assert_eq!(&claims["htu"], &json!(URL));
                prop_assert_eq!(&claims["ath"], &json!(ath));
                let iat = claims["iat"].as_i64().expect("integer iat");
                prop_assert!((iat - NOW).abs() <= 60);
                let jti = claims["jti"].as_str().expect("string jti");
                prop_assert!(!jti.is_empty() && jti.len() <= 256);
            }
            Ok(())
        },
    );
}

/// Times a client may put in a nonce, or a clock may read: the extremes and their neighbours
/// most of the time, anything some of the time.
fn extreme_time() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MAX),
        Just(0),
        i64::MIN..i64::MIN + 1_000,
        i64::MAX - 1_000..=i64::MAX,
        NOW - 1_000..NOW + 1_000,
        any::<i64>(),
    ]
}

/// Whether a nonce issued at `issued` is fresh at `now`, written out with wide integers.
fn nonce_fresh(issued: i64, now: i64) -> bool {
    let (issued, now) = (i128::from(issued), i128::from(now));
    issued <= now + 5 && now - issued <= i128::from(NONCE_LIFETIME_SECS)
}

/// Server nonces carry a time the client can choose (ATTACKS 46): `i64::MIN` once made the
/// freshness check overflow and panic. Any bytes and any clock reading get a yes or a no.
#[test]
fn dpop_nonces_with_any_bytes_and_times() {
    let key = NonceKey::new([7; 32]);
    let with_tag = |issued: i64, tag: &[u8]| {
        let mut bytes = issued.to_be_bytes().to_vec();
        bytes.extend_from_slice(tag);
        leash_core::b64::encode(bytes)
    };
    // Regressions: the extremes with a forged tag, at the extremes of the clock.
    for issued in [i64::MIN, i64::MAX, -1] {
        for now in [i64::MIN, 0, NOW, i64::MAX] {
            assert!(!key.accepts(&with_tag(issued, &[0; 16]), now));
        }
    }

    fuzz(
        "nonce/arbitrary text",
        (".{0,48}", extreme_time()),
        |(text, now)| {
            // A tag is 128 bits: text that is no nonce of this key never passes.
            prop_assert!(!key.accepts(&text, now));
            Ok(())
        },
    );
    fuzz(
        "nonce/random bytes",
        (
            proptest::collection::vec(any::<u8>(), 0..32),
            extreme_time(),
        ),
        |(bytes, now)| {
            let nonce = leash_core::b64::encode(&bytes);
            if key.accepts(&nonce, now) {
                // Only a nonce this key issued can pass: the odds of a random tag are 2^-128.
                let issued = i64::from_be_bytes(bytes[..8].try_into().unwrap());
                prop_assert_eq!(&nonce, &key.issue(issued));
            }
            Ok(())
        },
    );
    fuzz(
        "nonce/forged tags with extreme times",
        (extreme_time(), any::<[u8; 16]>(), extreme_time()),
        |(issued, tag, now)| {
            let nonce = with_tag(issued, &tag);
            prop_assert!(!key.accepts(&nonce, now) || nonce == key.issue(issued));
            Ok(())
        },
    );
    fuzz(
        "nonce/valid tags with extreme times",
        (extreme_time(), extreme_time()),
        |(issued, now)| {
            prop_assert_eq!(
                key.accepts(&key.issue(issued), now),
                nonce_fresh(issued, now)
            );
            Ok(())
        },
    );
}

#[test]
fn token_endpoint_form_parsing() {
    use leash_server::extract::Form;

    // Repeated parameters, bytes that are not UTF-8 (raw or escaped) and parameters without a
    // name (found by this target: `=` parsed as a parameter named "") are refused.
    for input in [&b"a=1&a=2"[..], b"\xff=1", b"a=%ff", b"=", b"a=1&=2", b"=x"] {
        assert!(Form::parse(input).is_err(), "{input:?}");
    }

    fuzz(
        "form/arbitrary bytes",
        proptest::collection::vec(any::<u8>(), 0..300),
        |bytes| {
            if let Ok(form) = Form::parse(&bytes) {
                // Whatever parses has each parameter once and names that are not empty.
                prop_assert!(form.0.keys().all(|k| !k.is_empty()));
            }
            Ok(())
        },
    );

    // Any parameters, encoded as a client library would: parsed back exactly.
    fuzz(
        "form/round trip",
        proptest::collection::hash_map("[^\u{0}]{1,12}", ".{0,40}", 0..8),
        |params: HashMap<String, String>| {
            let mut encoder = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &params {
                encoder.append_pair(k, v);
            }
            let body = encoder.finish();
            let parsed = Form::parse(body.as_bytes()).expect("a well-formed form parses");
            prop_assert_eq!(parsed.0, params);
            Ok(())
        },
    );
}

/// `segments` without one trailing empty segment: a pattern matches a path with or without one
/// trailing slash (API §6).
fn without_slash(mut segments: Vec<&str>) -> Vec<&str> {
    if segments.len() > 1 && segments.last() == Some(&"") {
        segments.pop();
    }
    segments
}

/// The reference matcher: dynamic programming over (pattern, path) positions.
fn reference_match(pattern: &[&str], path: &[&str]) -> bool {
    let (p, s) = (pattern.len(), path.len());
    let mut table = vec![vec![false; s + 1]; p + 1];
    table[p][s] = true;
    for i in (0..p).rev() {
        for j in (0..=s).rev() {
            table[i][j] = match pattern[i] {
                "**" => table[i + 1][j] || (j < s && table[i][j + 1]),
                "*" => j < s && !path[j].is_empty() && table[i + 1][j + 1],
                literal => j < s && path[j] == literal && table[i + 1][j + 1],
            };
        }
    }
    table[0][0]
}

#[test]
fn route_and_path_matching() {
    let segment = prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("*".to_owned()),
        Just("**".to_owned()),
        Just(String::new()),
    ];
    let pattern =
        proptest::collection::vec(segment, 0..5).prop_map(|s| format!("/{}", s.join("/")));
    let path =
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c"), Just("")], 1..7)
            .prop_map(|s| format!("/{}", s.join("/")));
    let method = prop_oneof![Just("GET"), Just("POST"), Just("*")];
    let routes = proptest::collection::vec((method, pattern), 1..4);

    fuzz(
        "routes/first match equals the reference",
        (routes, path, prop_oneof![Just("GET"), Just("POST")]),
        |(routes, path, method)| {
            let table = RouteTable::new(
                routes
                    .iter()
                    .enumerate()
                    .map(|(i, (m, p))| (*m, p.as_str(), i)),
            )
            .expect("patterns of whole segments compile");
            let Ok(segments) = safe_segments(&path) else {
                return Ok(());
            };
            let path_segments = without_slash(segments.clone());
            let expected = routes.iter().position(|(m, p)| {
                let pattern = without_slash(p[1..].split('/').collect());
                (*m == "*" || *m == method) && reference_match(&pattern, &path_segments)
            });
            prop_assert_eq!(table.find(method, &segments).copied(), expected);
            Ok(())
        },
    );

    // Escapes and characters that decode or fold into something else (issue #27): overlong
    // and broken UTF-8, fullwidth and leader dots, fullwidth separators and letters.
    let piece = prop_oneof![
        Just("a"),
        Just("."),
        Just("/"),
        Just("%C0%AE"),
        Just("%E0%80%AE"),
        Just("%FF"),
        Just("%C3"),
        Just("%C3%A9"),
        Just("%EF%BC%8E"),
        Just("\u{FF0E}"),
        Just("%E2%80%A4"),
        Just("%E2%80%A5"),
        Just("%EF%BC%8F"),
        Just("\u{FF3C}"),
        Just("%EF%BD%81"),
        Just("%EF%BD%B1"),
        Just("e%CC%81"),
    ];
    let tricky = proptest::collection::vec(piece, 0..10).prop_map(|p| format!("/{}", p.concat()));
    let path = prop_oneof![".{0,80}".boxed(), tricky.boxed()];
    fuzz("paths/accepted paths are canonical", path, |path| {
        if let Ok(segments) = safe_segments(&path) {
            prop_assert_eq!(format!("/{}", segments.join("/")), path.clone());
            let last = segments.len() - 1;
            for (i, segment) in segments.iter().enumerate() {
                prop_assert!(!segment.is_empty() || i == last);
                prop_assert!(*segment != "." && *segment != "..");
                let decoded = percent_decode(segment);
                prop_assert!(!decoded.contains(&b'/') && !decoded.contains(&b'\\'));
                prop_assert!(decoded != b"." && decoded != b"..");
                prop_assert!(!decoded.iter().any(u8::is_ascii_control));
                // Decoded, a segment is UTF-8 whose compatibility form is no dot segment and
                // gains no ASCII (no separator, no letter a policy could name); composing
                // may take some away (`e` + U+0301 is `é`).
                let text = std::str::from_utf8(&decoded);
                prop_assert!(text.is_ok(), "{segment:?} is not UTF-8 decoded");
                let text = text.unwrap_or_default();
                use unicode_normalization::UnicodeNormalization as _;
                let folded: String = text.nfkc().collect();
                prop_assert!(folded != "." && folded != "..", "{segment:?}");
                let mut left = text.chars().filter(char::is_ascii).collect::<Vec<_>>();
                for c in folded.chars().filter(char::is_ascii) {
                    let found = left.iter().position(|l| *l == c);
                    prop_assert!(found.is_some(), "{segment:?} folds into {c:?}");
                    if let Some(at) = found {
                        left.swap_remove(at);
                    }
                }
            }
        }
        Ok(())
    });
}

fn percent_decode(segment: &str) -> Vec<u8> {
    let bytes = segment.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = segment
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn cedar_context_from_a_request() {
    let text = ".{0,30}";
    let facts = (
        (
            text,
            text,
            "[a-z]{1,6}:[a-z_]{1,10}",
            "[a-z]{1,8}",
            text,
            text,
        ),
        (
            text,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            any::<i64>(),
            any::<i64>(),
            proptest::collection::vec("[a-z]{1,6}:[a-z_]{1,10}", 0..4),
        ),
    );
    fuzz(
        "cedar/arbitrary request facts",
        facts,
        |(
            (principal, human, action, upstream, method, path),
            (purpose, delegated, high_risk, requires, attached),
            (age, now, mut grant_actions),
        )| {
            grant_actions.push(action.clone());
            let actions: BTreeSet<String> = grant_actions.iter().cloned().collect();
            // A policy that uses the context as a value has every attribute built; it never
            // fires (no hour is 24).
            let whole_context =
                r#"forbid(principal, action, resource) when { {"c": context}.c.hour == 24 };"#;
            let engine =
                PolicyEngine::from_sources(&actions, &[("all.cedar".into(), whole_context.into())])
                    .expect("the policies load");
            let facts = Facts {
                mode: if delegated {
                    leash_policy::Mode::Delegated
                } else {
                    leash_policy::Mode::Direct
                },
                principal: &principal,
                human: &human,
                action: &action,
                upstream: &upstream,
                method: &method,
                path: &path,
                grant_id: "grt_1",
                purpose: &purpose,
                grant_actions: &grant_actions,
                grant_age_seconds: age,
                high_risk,
                grant_requires_approval: requires,
                approval_attached: attached,
                now,
                mcp: None,
            };
            let decision = engine.authorize(&facts);
            // Deterministic, and a high-risk or approval-bound delegated request without an
            // approval is never simply allowed.
            prop_assert_eq!(&engine.authorize(&facts), &decision);
            if delegated && (high_risk || requires) && !attached {
                prop_assert!(!matches!(decision, Decision::Allow { .. }), "{decision:?}");
            }
            Ok(())
        },
    );
}

/// A valid chain of `n` events as exported lines.
fn chain(n: u64) -> Vec<String> {
    let mut prev = leash_core::audit::GENESIS_HASH.to_owned();
    (1..=n)
        .map(|seq| {
            let mut event = AuditEvent::new("gateway.request", Mode::Delegated, NOW + seq as i64);
            event.subject = Some("usr_alice".into());
            event.actor = Some("spiffe://example.org/agent/mailbot".into());
            event.action = Some("mail:read".into());
            event.path = Some(format!("/messages/{seq}"));
            event.decision = Some(Outcome::Allow);
            let line = event.seal(seq, &prev).unwrap();
            prev = event.hash.clone();
            line
        })
        .collect()
}

/// Lines through the verifier, with a signed checkpoint of the original chain's head (as an
/// export carries one); `Ok` if all of them pass.
fn verify(lines: &[String], head: &Checkpoint) -> Result<u64, u64> {
    let key = token_key();
    let mut verifier =
        ChainVerifier::new(std::slice::from_ref(head), |_| Some(key.public())).unwrap();
    for line in lines {
        verifier.push(line).map_err(|e| e.seq)?;
    }
    verifier.finish().map_err(|e| e.seq)
}

#[test]
fn audit_verifier_on_arbitrary_files() {
    let original = chain(6);
    let last: Value = serde_json::from_str(&original[5]).unwrap();
    let head = Checkpoint::sign(&token_key(), 6, last["hash"].as_str().unwrap(), NOW).unwrap();
    assert_eq!(verify(&original, &head), Ok(6));
    assert_eq!(
        verify(&original[..5], &head),
        Err(6),
        "a cut tail is caught"
    );

    fuzz(
        "audit/arbitrary lines",
        proptest::collection::vec(".{0,200}", 0..6),
        |lines| {
            // Text that is not the chain never verifies.
            prop_assert!(verify(&lines, &head).is_err());
            Ok(())
        },
    );

    let edit = (0..6usize, mutation(), 0..4u8, 0..6usize);
    fuzz("audit/edited export", edit, |(line, how, kind, other)| {
        let mut lines = original.clone();
        match kind {
            0 => lines[line] = mutate(&lines[line], &how),
            1 => {
                lines.remove(line);
            }
            2 => lines.swap(line, other),
            _ => lines.insert(line, mutate(&original[other], &how)),
        }
        // Whatever verifies says the same as the original, event for event (a line may be
        // re-indented or have its members reordered and still be the same event).
        if verify(&lines, &head).is_ok() {
            prop_assert_eq!(lines.len(), original.len());
            for (got, want) in lines.iter().zip(&original) {
                let got: Value = serde_json::from_str(got).unwrap();
                let want: Value = serde_json::from_str(want).unwrap();
                prop_assert_eq!(got, want);
            }
        }
        Ok(())
    });
}
