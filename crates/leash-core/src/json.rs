//! JSON the way Leash reads and hashes it: one strict parser for what clients send (duplicate
//! members refused at any depth, lone surrogates and invalid UTF-8 refused, nesting bounded),
//! and one RFC 8785 (JCS) canonical form for what Leash hashes (audit events, MCP calls).

use std::cell::Cell;
use std::fmt;

use serde::Serialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The deepest nesting of arrays and objects [`parse_strict`] callers use by default: far more
/// than any token or MCP message needs, and little enough stack however deep a document is.
pub const MAX_DEPTH: usize = 64;

/// Why [`parse_strict`] refused a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictError {
    /// The bytes are not UTF-8.
    #[error("not UTF-8")]
    NotUtf8,
    /// Not exactly one JSON value (syntax error, nothing, or trailing data).
    #[error("{0}")]
    Syntax(String),
    /// An object names a member twice (the name, cut to 64 characters).
    #[error("duplicate member {0:?}")]
    Duplicate(String),
    /// A string escapes half of a UTF-16 surrogate pair (`"\ud800"`, or a low surrogate first).
    #[error("lone surrogate in a string escape")]
    LoneSurrogate,
    /// A number too large for a double (`1e400`).
    #[error("number out of range")]
    NumberOutOfRange,
    /// Arrays and objects nested deeper than the limit.
    #[error("nested deeper than {0} arrays and objects")]
    TooDeep(usize),
}

/// Parses exactly one JSON value from `bytes`, refusing duplicate member names at any depth,
/// lone surrogates, invalid UTF-8, trailing data and nesting deeper than `max_depth` arrays and
/// objects (the top level counts as one). Numbers are kept as serde_json reads them: an integer
/// within `u64`/`i64` stays an integer, anything else is a double.
pub fn parse_strict(bytes: &[u8], max_depth: usize) -> Result<Value, StrictError> {
    // serde_json checks UTF-8 too, but only inside strings; say it plainly for the whole input.
    std::str::from_utf8(bytes).map_err(|_| StrictError::NotUtf8)?;
    let problem = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = StrictValue {
        depth_left: max_depth,
        max_depth,
        problem: &problem,
    };
    let parsed = seed.deserialize(&mut de).and_then(|value| {
        de.end()?;
        Ok(value)
    });
    parsed.map_err(|error| match problem.take() {
        Some(found) => found,
        None => classify(&error),
    })
}

/// The serde_json error's kind, by its code's message (serde_json's `ErrorCode` displays; the
/// tests pin each one this relies on). serde_json says "unexpected end of hex escape" only when
/// a leading surrogate is not followed by `\u` (a short escape is "invalid escape").
fn classify(error: &serde_json::Error) -> StrictError {
    let message = error.to_string();
    if message.contains("surrogate") || message.starts_with("unexpected end of hex escape") {
        StrictError::LoneSurrogate
    } else if message.starts_with("number out of range") {
        StrictError::NumberOutOfRange
    } else {
        StrictError::Syntax(message)
    }
}

/// Deserializes a `serde_json::Value` but fails on duplicate object members at any depth
/// (RFC 7515 §5.2, RFC 7493 §2.3) and on nesting deeper than `depth_left`, recording which
/// in `problem` (serde's custom errors carry only text).
#[derive(Clone, Copy)]
struct StrictValue<'p> {
    depth_left: usize,
    max_depth: usize,
    problem: &'p Cell<Option<StrictError>>,
}

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl StrictValue<'_> {
    /// Enters a container: the seed for its members, or the refusal when no depth is left.
    fn nested<E: de::Error>(self) -> Result<Self, E> {
        match self.depth_left.checked_sub(1) {
            Some(depth_left) => Ok(StrictValue { depth_left, ..self }),
            None => Err(self.fail(StrictError::TooDeep(self.max_depth))),
        }
    }

    fn fail<E: de::Error>(&self, problem: StrictError) -> E {
        let error = E::custom(&problem);
        self.problem.set(Some(problem));
        error
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        // The container itself is one level: its items get what is left after it.
        let inner = self.nested()?;
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let inner = self.nested()?;
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let name: String = key.chars().take(64).collect();
                return Err(self.fail(StrictError::Duplicate(name)));
            }
            let value = map.next_value_seed(inner)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// A value that could not be put in canonical form (only a non-finite number could cause it, and
/// a `serde_json::Value` cannot hold one).
#[derive(Debug, thiserror::Error)]
#[error("cannot canonicalise: {0}")]
pub struct CanonicalError(pub(crate) String);

/// RFC 8785 form, by the `canon-json` crate's serde_json formatter (which sorts each object's
/// members as it closes, without building a tree: about a tenth of the cost of the crate that
/// builds one, and the audit append path canonicalises every event). Integers are written
/// exactly as integers, also beyond 2^53 where RFC 8785 would go through a double.
pub fn canonical(value: &impl Serialize) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(512);
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, canon_json::CanonicalFormatter::new());
    value
        .serialize(&mut serializer)
        .map_err(|e| CanonicalError(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Value, StrictError> {
        parse_strict(text.as_bytes(), MAX_DEPTH)
    }

    #[test]
    fn duplicates_are_refused_at_any_depth() {
        assert_eq!(
            parse(r#"{"a":1,"a":2}"#),
            Err(StrictError::Duplicate("a".into()))
        );
        assert_eq!(
            parse(r#"[{"x":{"name":"a","name":"b"}}]"#),
            Err(StrictError::Duplicate("name".into()))
        );
        // Escapes are decoded before comparing: "\u0061" is "a".
        assert_eq!(
            parse(r#"{"a":1,"\u0061":2}"#),
            Err(StrictError::Duplicate("a".into()))
        );
        assert!(parse(r#"{"a":{"a":1},"b":[{"a":1},{"a":2}]}"#).is_ok());
    }

    #[test]
    fn lone_surrogates_and_bad_utf8_are_refused() {
        assert_eq!(parse(r#""\ud800""#), Err(StrictError::LoneSurrogate));
        assert_eq!(parse(r#""\udc00\ud800""#), Err(StrictError::LoneSurrogate));
        assert_eq!(parse(r#"{"\ud800":1}"#), Err(StrictError::LoneSurrogate));
        assert_eq!(parse(r#""\ud800x""#), Err(StrictError::LoneSurrogate));
        assert_eq!(parse(r#""\ud800\n""#), Err(StrictError::LoneSurrogate));
        assert!(matches!(parse(r#""\ud8""#), Err(StrictError::Syntax(_))));
        assert_eq!(
            parse(r#""\ud83d\ude00""#),
            Ok(Value::String("\u{1f600}".into()))
        );
        assert_eq!(
            parse_strict(b"\"\xff\"", MAX_DEPTH),
            Err(StrictError::NotUtf8)
        );
        // An overlong encoding of '/' is not UTF-8 either.
        assert_eq!(
            parse_strict(b"\"\xc0\xaf\"", MAX_DEPTH),
            Err(StrictError::NotUtf8)
        );
    }

    #[test]
    fn exactly_one_value() {
        assert!(matches!(parse(""), Err(StrictError::Syntax(_))));
        assert!(matches!(parse("{} {}"), Err(StrictError::Syntax(_))));
        assert!(matches!(parse("{}x"), Err(StrictError::Syntax(_))));
        assert!(matches!(parse("\u{feff}{}"), Err(StrictError::Syntax(_))));
        assert!(parse(" {} \n").is_ok());
        assert_eq!(parse("1e400"), Err(StrictError::NumberOutOfRange));
    }

    #[test]
    fn depth_is_bounded_without_exhausting_the_stack() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(
            parse(&nested(MAX_DEPTH + 1)),
            Err(StrictError::TooDeep(MAX_DEPTH))
        );
        assert_eq!(
            parse(&nested(1_000_000)),
            Err(StrictError::TooDeep(MAX_DEPTH))
        );
        let objects = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(parse(&objects), Err(StrictError::TooDeep(MAX_DEPTH)));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(parse(&objects).is_ok());
    }

    #[test]
    fn canonical_form_sorts_and_strips() {
        let value = parse(r#"{ "b" : [1, 2.0, "x"], "a" : {"d": true, "c": null} }"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical(&value).unwrap()).unwrap(),
            r#"{"a":{"c":null,"d":true},"b":[1,2,"x"]}"#
        );
    }
}
