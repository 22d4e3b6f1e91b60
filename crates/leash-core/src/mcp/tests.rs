use proptest::prelude::*;
use serde_json::json;

use super::*;

fn parse(text: &str) -> Result<Message, ParseError> {
    parse_message(text.as_bytes())
}

fn not_rpc(text: &str) {
    assert!(
        matches!(parse(text), Err(ParseError::NotJsonRpc(_))),
        "{text}: {:?}",
        parse(text)
    );
}

/// Parses, checks the message, and checks that it serialises back to the same JSON.
fn round_trip(text: &str, expected: Message) {
    let message = parse(text).unwrap();
    assert_eq!(message, expected, "{text}");
    let original: Value = serde_json::from_str(text).unwrap();
    assert_eq!(message.to_value(), original, "{text}");
    let again = parse_message(message.to_value().to_string().as_bytes()).unwrap();
    assert_eq!(again, message);
}

#[test]
fn messages_from_the_mcp_spec_round_trip() {
    round_trip(
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",
            "capabilities":{"roots":{"listChanged":true},"sampling":{},"elicitation":{}},
            "clientInfo":{"name":"ExampleClient","title":"Example Client Display Name","version":"1.0.0"}}}"#,
        Message::Request {
            id: RequestId::Number(1),
            method: "initialize".into(),
            params: Some(json!({"protocolVersion":"2025-06-18",
                "capabilities":{"roots":{"listChanged":true},"sampling":{},"elicitation":{}},
                "clientInfo":{"name":"ExampleClient","title":"Example Client Display Name","version":"1.0.0"}})),
        },
    );
    round_trip(
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        Message::Notification {
            method: "notifications/initialized".into(),
            params: None,
        },
    );
    round_trip(
        r#"{"jsonrpc":"2.0","id":"list-1","method":"tools/list","params":{"cursor":"optional-cursor-value"}}"#,
        Message::Request {
            id: RequestId::String("list-1".into()),
            method: "tools/list".into(),
            params: Some(json!({"cursor":"optional-cursor-value"})),
        },
    );
    round_trip(
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_weather","arguments":{"location":"New York"}}}"#,
        Message::Request {
            id: RequestId::Number(2),
            method: "tools/call".into(),
            params: Some(json!({"name":"get_weather","arguments":{"location":"New York"}})),
        },
    );
    // The client answers the server's `sampling/createMessage` and `elicitation/create`.
    round_trip(
        r#"{"jsonrpc":"2.0","id":1,"result":{"role":"assistant","content":{"type":"text",
            "text":"The capital of France is Paris."},"model":"claude-3-sonnet-20240307","stopReason":"endTurn"}}"#,
        Message::Response {
            id: RequestId::Number(1),
            result: Ok(json!({"role":"assistant","content":{"type":"text",
                "text":"The capital of France is Paris."},"model":"claude-3-sonnet-20240307","stopReason":"endTurn"})),
        },
    );
    round_trip(
        r#"{"jsonrpc":"2.0","id":"e-7","error":{"code":-1,"message":"User rejected sampling request"}}"#,
        Message::Response {
            id: RequestId::String("e-7".into()),
            result: Err(json!({"code":-1,"message":"User rejected sampling request"})),
        },
    );
    round_trip(
        r#"{"jsonrpc":"2.0","id":-9223372036854775808,"method":"ping","params":[]}"#,
        Message::Request {
            id: RequestId::Number(i64::MIN),
            method: "ping".into(),
            params: Some(json!([])),
        },
    );
}

#[test]
fn a_batch_is_refused() {
    assert_eq!(
        parse(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#),
        Err(ParseError::Batch)
    );
    assert_eq!(parse(" \n[]"), Err(ParseError::Batch));
}

#[test]
fn duplicate_names_anywhere_are_refused() {
    // ATTACKS 56: the policy would judge one `name`, the server call the other.
    let text = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"read_contact","name":"delete_contact","arguments":{}}}"#;
    assert!(matches!(parse(text), Err(ParseError::NotIJson(m)) if m.contains("\"name\"")));
    let text = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"pay","arguments":{"amount":1,"amount":100000}}}"#;
    assert!(matches!(parse(text), Err(ParseError::NotIJson(_))));
    let text = r#"{"jsonrpc":"2.0","id":3,"id":4,"method":"ping"}"#;
    assert!(matches!(parse(text), Err(ParseError::NotIJson(_))));
}

#[test]
fn lone_surrogates_and_invalid_utf8_are_refused() {
    for text in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\ud800","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\udc00\ud800","arguments":{}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"\ud800":1}}}"#,
    ] {
        assert!(
            matches!(parse(text), Err(ParseError::NotIJson(_))),
            "{text}"
        );
    }
    let mut bytes = br#"{"jsonrpc":"2.0","method":"x","params":{"a":""}}"#.to_vec();
    bytes.insert(40, 0xff);
    assert!(matches!(
        parse_message(&bytes),
        Err(ParseError::NotIJson(_))
    ));
}

#[test]
fn method_with_result_or_error_and_result_with_error_are_refused() {
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"method":"ping","error":{"code":1,"message":"x"}}"#);
    not_rpc(r#"{"jsonrpc":"2.0","method":"notifications/x","result":{}}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"x"}}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1}"#);
    not_rpc(r#"{"jsonrpc":"2.0","result":{}}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"result":{},"params":{}}"#);
}

#[test]
fn ids_are_strings_or_i64() {
    for id in [
        "null",
        "1.5",
        "1.0",
        "-0",
        "1e2",
        "true",
        "{}",
        "[]",
        "9223372036854775808",
    ] {
        not_rpc(&format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#));
        not_rpc(&format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{}}}}"#));
    }
    assert!(parse(r#"{"jsonrpc":"2.0","id":9223372036854775807,"method":"ping"}"#).is_ok());
    assert!(parse(r#"{"jsonrpc":"2.0","id":"","method":"ping"}"#).is_ok());
}

#[test]
fn envelope_rules() {
    not_rpc(r#"{"id":1,"method":"ping"}"#);
    not_rpc(r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#);
    not_rpc(r#"{"jsonrpc":2.0,"id":1,"method":"ping"}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"method":7}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"method":""}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":"x"}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":null}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1.5,"message":"x"}}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1}}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x","extra":1}}"#);
    not_rpc(r#"{"jsonrpc":"2.0","id":1,"error":"x"}"#);
    not_rpc(r#""ping""#);
    not_rpc("null");
}

#[test]
fn exactly_one_value() {
    for text in [
        r#"{"jsonrpc":"2.0","method":"ping"} x"#,
        r#"{"jsonrpc":"2.0","method":"ping"}{"jsonrpc":"2.0","method":"ping"}"#,
        r#"{"jsonrpc":"2.0","method":"ping"}"#.trim_end_matches('}'),
        "",
    ] {
        assert!(matches!(parse(text), Err(ParseError::NotJson(_))), "{text}");
    }
    assert!(parse("\r\n{\"jsonrpc\":\"2.0\",\"method\":\"ping\"}\r\n").is_ok());
}

#[test]
fn a_depth_bomb_is_refused() {
    let bomb = |n: usize| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"a":{}{}}}}}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    // The message, params and arguments are three levels.
    assert!(parse(&bomb(MAX_DEPTH - 3)).is_ok());
    assert_eq!(parse(&bomb(MAX_DEPTH - 2)), Err(ParseError::TooDeep));
    assert_eq!(parse(&bomb(2_000_000)), Err(ParseError::TooDeep));
}

#[test]
fn errors_say_what_would_be_right() {
    let message = parse(r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#)
        .unwrap_err()
        .to_string();
    assert!(message.contains("string or an integer"), "{message}");
    assert!(ParseError::Batch.to_string().contains("one message"));
}

#[test]
fn call_digest_ignores_member_order_and_whitespace_only() {
    let a: Value = serde_json::from_str(
        r#"{"to":"a@example.org","amount":10,"tags":["x","y"],"o":{"b":1,"a":2}}"#,
    )
    .unwrap();
    let b: Value = serde_json::from_str(
        "{ \"o\" : {\"a\":2, \"b\":1},\n \"amount\": 10, \"tags\": [\"x\", \"y\"], \"to\": \"a@example.org\" }",
    )
    .unwrap();
    let digest = call_digest("pay", &a);
    assert_eq!(digest, call_digest("pay", &b));
    assert_eq!(digest.len(), 64);
    assert!(
        digest
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    );
    assert_ne!(digest, call_digest("pay2", &a));
    let mut c = a.clone();
    c["amount"] = json!(11);
    assert_ne!(digest, call_digest("pay", &c));
    let mut d = a.clone();
    d["tags"] = json!(["y", "x"]);
    assert_ne!(
        digest,
        call_digest("pay", &d),
        "array order is part of the call"
    );
    // The digest is of the RFC 8785 form of {name, arguments}.
    assert_eq!(
        call_digest("t", &json!({"b": 1, "a": "é"})),
        hex::encode(Sha256::digest(
            r#"{"arguments":{"a":"é","b":1},"name":"t"}"#
        ))
    );
}

proptest! {
    #[test]
    fn parse_message_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_message(&bytes);
    }

    #[test]
    fn parse_message_never_panics_on_json_like_input(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("{"), Just("}"), Just("["), Just("]"), Just(","), Just(":"),
                Just("\"jsonrpc\""), Just("\"2.0\""), Just("\"id\""), Just("\"method\""),
                Just("\"params\""), Just("\"result\""), Just("\"error\""), Just("1"),
                Just("-0"), Just("1.5"), Just("null"), Just("\"\\ud800\""), Just(" "),
            ],
            0..64,
        )
    ) {
        let text: String = parts.concat();
        if let Ok(message) = parse_message(text.as_bytes()) {
            // What parses, serialises back to an equal message.
            let again = parse_message(message.to_value().to_string().as_bytes());
            prop_assert_eq!(again, Ok(message));
        }
    }

    #[test]
    fn call_digest_is_independent_of_member_order(
        members in proptest::collection::btree_map("[a-z]{1,3}", any::<i64>(), 0..8)
    ) {
        let forward: Map<String, Value> = members.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let backward: Map<String, Value> = members.iter().rev().map(|(k, v)| (k.clone(), json!(v))).collect();
        prop_assert_eq!(
            call_digest("t", &Value::Object(forward)),
            call_digest("t", &Value::Object(backward))
        );
    }
}
