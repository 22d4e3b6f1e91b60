//! Gateway request paths: the safety rules a path must pass before anything judges it, and the
//! route table that names the action of a request (API §5, §6). Patterns are compiled once at
//! start; `*` matches one segment, `**` any number.

/// Why a request path is refused (400 `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path must start with /")]
    NotAbsolute,
    /// An empty segment (`//`).
    #[error("the path has an empty segment (//)")]
    EmptySegment,
    /// A `.` or `..` segment, plain or encoded.
    #[error("the path has a . or .. segment")]
    DotSegment,
    /// A character that upstreams interpret differently (`\`, `;`, controls).
    #[error("the path has a character that is not allowed: {0:?}")]
    Forbidden(char),
    /// A bad, ambiguous or non-canonical percent escape (`%2f`, `%5c`, `%00`, `%25`, or an
    /// encoded unreserved character such as `%2e` or `%61`).
    #[error("the path has a percent escape that is not allowed")]
    Escape,
    /// A segment that, percent-decoded, is not UTF-8 (an overlong `%C0%AE`, a lone `%FF`).
    #[error("the path has a segment that is not UTF-8 once percent-decoded")]
    NotUtf8,
    /// A segment whose Unicode compatibility form (NFKC) is `.` or `..`, or with a character
    /// that folds into ASCII (fullwidth `．`, `／`, `＼`, `％`, `ａ`).
    #[error(
        "the path has a segment whose Unicode compatibility form (NFKC) is a dot segment or \
         has characters that fold into ASCII"
    )]
    Confusable,
}

/// Checks a raw request path (without query) and returns its segments. A path that passes is
/// canonical: what policy judges is byte for byte what an upstream receives and interprets.
pub fn safe_segments(path: &str) -> Result<Vec<&str>, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    if let Some(c) = path
        .chars()
        .find(|c| matches!(c, '\\' | ';' | '#' | '?') || c.is_control())
    {
        return Err(PathError::Forbidden(c));
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = path.get(i + 1..i + 3).ok_or(PathError::Escape)?;
            let value = u8::from_str_radix(hex, 16).map_err(|_| PathError::Escape)?;
            let unreserved =
                value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~');
            if unreserved || matches!(value, b'/' | b'\\' | b'%' | b';') || value.is_ascii_control()
            {
                return Err(PathError::Escape);
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (index, segment) in segments.iter().enumerate() {
        if segment.is_empty() && index != last {
            return Err(PathError::EmptySegment);
        }
        if matches!(*segment, "." | "..") {
            return Err(PathError::DotSegment);
        }
        check_decoded(segment)?;
    }
    Ok(segments)
}

/// Upstreams decode escapes, and some fold Unicode to its compatibility form (NFKC) before
/// they route: a segment must not become a dot segment, a separator, or other ASCII than policy
/// judged on either way. `segment`'s escapes are already known to be well formed.
fn check_decoded(segment: &str) -> Result<(), PathError> {
    use unicode_normalization::UnicodeNormalization as _;
    if segment.is_ascii() && !segment.contains('%') {
        // NFKC leaves ASCII as it is, and the raw characters were checked already.
        return Ok(());
    }
    let decoded = percent_decode(segment.as_bytes());
    let decoded = std::str::from_utf8(&decoded).map_err(|_| PathError::NotUtf8)?;
    let folded: String = decoded.nfkc().collect();
    if matches!(folded.as_str(), "." | "..") {
        return Err(PathError::Confusable);
    }
    // A character that folds into ASCII (`．`, `／`, `＼`, `％`, `ａ`) would let `/ａdmin` pass a
    // policy about `/admin` and reach an upstream that folds it. Composition never makes ASCII,
    // so checking each character alone covers every sequence; text that stays non-ASCII
    // (accents, CJK, decomposed letters) passes.
    let folds_into_ascii = decoded
        .chars()
        .filter(|c| !c.is_ascii())
        .any(|c| std::iter::once(c).nfkc().any(|f| f.is_ascii()));
    if folds_into_ascii {
        return Err(PathError::Confusable);
    }
    Ok(())
}

/// `bytes` with every `%XX` escape replaced by its byte; an incomplete escape stays as it is.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&first, tail)) = rest.split_first() {
        let escaped = match tail {
            [high, low, ..] if first == b'%' => hex_value(*high)
                .zip(hex_value(*low))
                .map(|(high, low)| (high << 4) | low),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                rest = tail.get(2..).unwrap_or_default();
            }
            None => {
                out.push(first);
                rest = tail;
            }
        }
    }
    out
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Any,
}

/// A route pattern that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route pattern {pattern:?}: {problem}")]
pub struct PatternError {
    /// The pattern as configured.
    pub pattern: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

#[derive(Debug, Clone)]
struct CompiledRoute<T> {
    method: Option<String>,
    segments: Vec<Segment>,
    value: T,
}

/// Routes in configuration order; the first match wins.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    routes: Vec<CompiledRoute<T>>,
}

impl<T> RouteTable<T> {
    /// Compiles `(method, path pattern, value)` triples; method `*` matches any method.
    pub fn new<'a>(
        routes: impl IntoIterator<Item = (&'a str, &'a str, T)>,
    ) -> Result<Self, PatternError> {
        let mut compiled = Vec::new();
        for (method, pattern, value) in routes {
            let error = |problem| PatternError {
                pattern: pattern.to_owned(),
                problem,
            };
            let rest = pattern
                .strip_prefix('/')
                .ok_or_else(|| error("must start with /"))?;
            let mut segments = Vec::new();
            for part in rest.split('/') {
                segments.push(match part {
                    "*" => Segment::One,
                    "**" => Segment::Any,
                    literal if literal.contains('*') => {
                        return Err(error("* must be a whole segment"));
                    }
                    literal => Segment::Literal(literal.to_owned()),
                });
            }
            without_trailing_slash(&mut segments);
            let method = (method != "*").then(|| method.to_ascii_uppercase());
            compiled.push(CompiledRoute {
                method,
                segments,
                value,
            });
        }
        Ok(Self { routes: compiled })
    }

    /// The value of the first route matching `method` and the path's `segments`. A pattern
    /// matches a path with or without one trailing slash (API §6): both lose it before they are
    /// compared.
    pub fn find(&self, method: &str, segments: &[&str]) -> Option<&T> {
        let segments = match segments.split_last() {
            Some((&"", rest)) if !rest.is_empty() => rest,
            _ => segments,
        };
        self.routes
            .iter()
            .find(|r| {
                r.method.as_deref().is_none_or(|m| m == method) && matches(&r.segments, segments)
            })
            .map(|r| &r.value)
    }
}

/// Drops one trailing empty segment (a trailing slash), unless it is the only one (`/`).
fn without_trailing_slash(segments: &mut Vec<Segment>) {
    if segments.len() > 1 && segments.last() == Some(&Segment::Literal(String::new())) {
        segments.pop();
    }
}

/// Whether `path` matches `pattern`, `**` standing for any run of segments. Wildcard matching
/// that goes back only to the latest `**`: a later `**` can absorb whatever an earlier one
/// would have, so earlier choices never need revisiting. At most pattern × path steps; trying
/// every split of the path between the `**`s instead took time to the power of their number, so
/// a long path against a route with a few of them could hold a worker for hours.
fn matches(pattern: &[Segment], path: &[&str]) -> bool {
    let (mut at_pattern, mut at_path) = (0, 0);
    // After the latest `**`: where the pattern goes on, and the path segment it resumed at.
    let mut resume: Option<(usize, usize)> = None;
    while at_path < path.len() {
        match pattern.get(at_pattern) {
            Some(Segment::Any) => {
                at_pattern += 1;
                resume = Some((at_pattern, at_path));
                continue;
            }
            Some(segment) if segment.matches_one(path[at_path]) => {
                at_pattern += 1;
                at_path += 1;
                continue;
            }
            _ => {}
        }
        // A mismatch: let the latest `**` take one more segment, or fail without one.
        let Some((after_any, resumed_at)) = resume else {
            return false;
        };
        resume = Some((after_any, resumed_at + 1));
        at_pattern = after_any;
        at_path = resumed_at + 1;
    }
    pattern[at_pattern..]
        .iter()
        .all(|segment| *segment == Segment::Any)
}

impl Segment {
    /// Whether this segment, not a `**`, matches `segment`.
    fn matches_one(&self, segment: &str) -> bool {
        match self {
            Self::One => !segment.is_empty(),
            Self::Literal(literal) => literal == segment,
            Self::Any => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_paths_pass_and_tricks_fail() {
        assert_eq!(
            safe_segments("/messages/42").unwrap(),
            vec!["messages", "42"]
        );
        assert_eq!(safe_segments("/messages/").unwrap(), vec!["messages", ""]);
        assert_eq!(
            safe_segments("/a%20b/c%3Ad").unwrap(),
            vec!["a%20b", "c%3Ad"]
        );
        for bad in [
            "messages",
            "/a//b",
            "//a",
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/%2e%2e/b",
            "/a/%2E%2E",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a%00b",
            "/a\\b",
            "/a;b",
            "/a%252fb",
            "/%61dmin",
            "/a%2",
            "/a%zz",
            "/a\u{0}b",
            "/a\nb",
        ] {
            assert!(safe_segments(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn first_match_wins_with_one_and_any_segment_wildcards() {
        let table = RouteTable::new([
            ("GET", "/messages/**", "mail:read"),
            ("POST", "/messages/*/send", "mail:send"),
            ("*", "/export", "mail:export"),
            ("GET", "/a/**/z", "deep"),
        ])
        .unwrap();
        let find = |m: &str, p: &str| table.find(m, &safe_segments(p).unwrap()).copied();
        assert_eq!(find("GET", "/messages"), Some("mail:read"));
        assert_eq!(find("GET", "/messages/1/2/3"), Some("mail:read"));
        assert_eq!(find("POST", "/messages/7/send"), Some("mail:send"));
        assert_eq!(find("POST", "/messages/7/8/send"), None);
        assert_eq!(
            find("POST", "/messages//send".replace("//", "/").as_str()),
            None
        );
        assert_eq!(find("DELETE", "/export"), Some("mail:export"));
        assert_eq!(find("GET", "/a/z"), Some("deep"));
        assert_eq!(find("GET", "/a/b/c/z"), Some("deep"));
        assert_eq!(find("GET", "/a/b/c"), None);
        assert_eq!(find("PUT", "/messages/1"), None);
    }

    #[test]
    fn decoded_segments_must_be_utf8_and_not_fold_into_dots_or_separators() {
        for (bad, error) in [
            ("/a/%C0%AE/b", PathError::NotUtf8),
            ("/a/%C0%AE%C0%AE/b", PathError::NotUtf8),
            ("/a/%FF", PathError::NotUtf8),
            ("/a/%E2%82", PathError::NotUtf8),
            // Fullwidth full stops, raw and encoded, alone and in pairs.
            ("/a/\u{FF0E}\u{FF0E}/b", PathError::Confusable),
            ("/a/\u{FF0E}", PathError::Confusable),
            ("/a/%EF%BC%8E%EF%BC%8E/b", PathError::Confusable),
            ("/a/%EF%BC%8E", PathError::Confusable),
            // One-dot leader and two-dot leader: NFKC `.` and `..`.
            ("/a/%E2%80%A4", PathError::Confusable),
            ("/a/%E2%80%A5", PathError::Confusable),
            // Fullwidth solidus, reverse solidus, semicolon, percent sign.
            ("/a/x%EF%BC%8Fy", PathError::Confusable),
            ("/a/x\u{FF3C}y", PathError::Confusable),
            ("/a/x%EF%BC%9By", PathError::Confusable),
            ("/a/%EF%BC%852f", PathError::Confusable),
        ] {
            assert_eq!(safe_segments(bad), Err(error), "{bad:?}");
        }
        // Fullwidth letters fold into the ASCII a policy may name.
        assert_eq!(safe_segments("/%EF%BD%81dmin"), Err(PathError::Confusable));
        assert_eq!(safe_segments("/\u{FF41}dmin"), Err(PathError::Confusable));
        // Text that stays non-ASCII passes as it was sent: accents (composed and decomposed),
        // halfwidth katakana (folds into fullwidth), CJK.
        assert_eq!(
            safe_segments("/caf%C3%A9/cafe%CC%81/%EF%BD%B1/\u{e9}t\u{e9}/%E6%97%A5").unwrap(),
            vec![
                "caf%C3%A9",
                "cafe%CC%81",
                "%EF%BD%B1",
                "\u{e9}t\u{e9}",
                "%E6%97%A5"
            ]
        );
    }

    #[test]
    fn a_pattern_matches_with_or_without_one_trailing_slash() {
        let table = RouteTable::new([
            ("GET", "/messages/*", "one"),
            ("GET", "/drafts/", "drafts"),
            ("GET", "/deep/**", "deep"),
            ("GET", "/", "root"),
        ])
        .unwrap();
        let find = |p: &str| table.find("GET", &safe_segments(p).unwrap()).copied();
        assert_eq!(find("/messages/1"), Some("one"));
        assert_eq!(find("/messages/1/"), Some("one"));
        // Only one: `/messages/1//` is an empty segment, refused before matching.
        assert!(safe_segments("/messages/1//").is_err());
        // `*` still needs a segment: the trailing slash is not one.
        assert_eq!(find("/messages/"), None);
        assert_eq!(find("/messages/1/2"), None);
        assert_eq!(find("/drafts"), Some("drafts"));
        assert_eq!(find("/drafts/"), Some("drafts"));
        assert_eq!(find("/deep"), Some("deep"));
        assert_eq!(find("/deep/"), Some("deep"));
        assert_eq!(find("/deep/a/b/"), Some("deep"));
        assert_eq!(find("/"), Some("root"));
        assert_eq!(find("/other/"), None);
    }

    #[test]
    fn bad_patterns_refused() {
        assert!(RouteTable::new([("GET", "messages", 1)]).is_err());
        assert!(RouteTable::new([("GET", "/mess*ges", 1)]).is_err());
    }

    /// The definition, written as the recursion it is: every way of splitting the path among
    /// the `**`s. Exponential; the property below checks the matcher against it on short input.
    fn by_definition(pattern: &[Segment], path: &[&str]) -> bool {
        match pattern.split_first() {
            None => path.is_empty(),
            Some((Segment::Any, rest)) => {
                (0..=path.len()).any(|skip| by_definition(rest, &path[skip..]))
            }
            Some((segment, rest)) => path.split_first().is_some_and(|(first, tail)| {
                segment.matches_one(first) && by_definition(rest, tail)
            }),
        }
    }

    proptest::proptest! {
        #[test]
        fn matching_agrees_with_the_definition(
            pattern in proptest::collection::vec(0u8..5, 0..7),
            path in proptest::collection::vec(0u8..3, 0..9),
        ) {
            // Literals "a" and "b", `*` and `**` in the pattern; "a", "b" and "" in the path.
            let pattern: Vec<Segment> = pattern
                .iter()
                .map(|p| match p {
                    0 => Segment::Literal("a".into()),
                    1 => Segment::Literal("b".into()),
                    2 => Segment::One,
                    _ => Segment::Any,
                })
                .collect();
            let path: Vec<&str> = path.iter().map(|p| ["a", "b", ""][*p as usize]).collect();
            proptest::prop_assert_eq!(matches(&pattern, &path), by_definition(&pattern, &path));
        }
    }

    /// A path that almost matches a route with several `**`: the split-every-way matcher took
    /// 23 ms for 80 repetitions here, growing as the fourth power (minutes for these 1,000, a
    /// 6 KB path); this one answers at once.
    #[test]
    fn several_any_wildcards_and_a_long_path_are_answered() {
        let table = RouteTable::new([("GET", "/a/**/b/**/c/**/d/**/e", "deep")]).unwrap();
        let mut path = String::from("/a");
        for _ in 0..1_000 {
            path.push_str("/b/c/d");
        }
        assert_eq!(table.find("GET", &safe_segments(&path).unwrap()), None);
        path.push_str("/e");
        assert_eq!(
            table.find("GET", &safe_segments(&path).unwrap()),
            Some(&"deep")
        );
    }
}
