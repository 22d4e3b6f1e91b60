//! The gateway never hands the agent what it injected: an upstream answer that echoes the
//! human's vaulted credential back (a debug endpoint printing request headers, a redirect
//! carrying the cookie, an error page quoting the `Authorization` header) would otherwise give
//! the agent exactly what Leash exists to keep from it. Headers are checked before anything is
//! sent (`502 credential_reflected`, as the proxy does, API §16); a body streams through
//! [`GuardedBody`], which holds back the end of a part only while it could be the start of a
//! secret (so a secret split across two parts is still seen whole, and a streamed answer, an
//! event stream, is not delayed by the guard), and cuts the answer off where one appears.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aho_corasick::Anchored;
use aho_corasick::automaton::Automaton as _;
use axum::body::Bytes;
use axum::http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

/// Pieces shorter than this are not looked for: they would match ordinary text.
const MIN_SECRET_LEN: usize = 8;

/// The secret pieces of the injected credential, as they could appear in an answer: the
/// value, a bearer token without its scheme, each cookie's value; each also as hex and as
/// base64 (both alphabets, at each of the three alignments a longer text could put it in), and
/// all compared without regard to ASCII case. An echo in another encoding (compressed, escaped)
/// is not recognised: the gateway asks upstreams for uncompressed answers and refuses
/// compressed ones where a credential was injected.
#[derive(Clone, Default)]
pub struct Secrets {
    /// A searcher for the pieces and their encodings, lowered (the pieces themselves are not
    /// kept). Shared: a request clones its credential's guard.
    finder: Option<Arc<Finder>>,
    /// The same pieces as an automaton whose states can be stepped through: whether the end of
    /// a part could start a piece (`AhoCorasick` searches faster but hides its states).
    starts: Option<Arc<aho_corasick::nfa::contiguous::NFA>>,
    /// The longest needle's length.
    longest: usize,
    /// The automaton could not be built: every answer counts as carrying the credential.
    unbuildable: bool,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

impl Secrets {
    /// The pieces of a credential injected as `value`.
    pub fn of(value: &[u8]) -> Self {
        Self::of_all(&[value])
    }

    /// The pieces of every credential of `values` (injected together: a vaulted credential and
    /// the forward proxy's cookies).
    pub fn of_all(values: &[&[u8]]) -> Self {
        let mut pieces = Vec::new();
        for value in values {
            let text = String::from_utf8_lossy(value);
            pieces.push(value.to_vec());
            if let Some(token) = text.strip_prefix("Bearer ") {
                pieces.push(token.as_bytes().to_vec());
            }
            for cookie in text.split(';') {
                if let Some((_, cookie_value)) = cookie.split_once('=') {
                    pieces.push(cookie_value.trim().as_bytes().to_vec());
                }
            }
        }
        pieces.retain(|piece| piece.len() >= MIN_SECRET_LEN);
        let mut needles = Vec::new();
        for piece in &pieces {
            needles.push(piece.clone());
            needles.push(hex::encode(piece).into_bytes());
            for skip in 0..3 {
                let aligned = piece.get(skip..).unwrap_or_default();
                let whole = aligned.len() - aligned.len() % 3;
                for engine in [
                    &base64::engine::general_purpose::STANDARD_NO_PAD,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ] {
                    use base64::Engine as _;
                    let encoded = engine.encode(&aligned[..whole]);
                    if encoded.len() >= MIN_SECRET_LEN {
                        needles.push(encoded.into_bytes());
                    }
                }
            }
        }
        // base64 is case-sensitive, but a case-insensitive match only errs towards cutting off.
        // The search is case-insensitive by lowering both sides (`found_in`): a needle occurs in
        // a text regardless of ASCII case exactly when the lowered needle occurs in the lowered
        // text. Built once per credential ([`SecretsCache`]).
        for needle in &mut needles {
            needle.make_ascii_lowercase();
        }
        needles.sort();
        needles.dedup();
        if needles.is_empty() {
            return Self::default();
        }
        let built = Finder::new(&needles).and_then(|finder| {
            let starts = aho_corasick::nfa::contiguous::Builder::new()
                .ascii_case_insensitive(true)
                .prefilter(false)
                .build(&needles)?;
            Ok((finder, starts))
        });
        let longest = needles.iter().map(Vec::len).max().unwrap_or(0);
        match built {
            Ok((finder, starts)) => Self {
                finder: Some(Arc::new(finder)),
                starts: Some(Arc::new(starts)),
                longest,
                unbuildable: false,
            },
            Err(e) => {
                // Fail closed: an answer that cannot be checked is not passed on.
                tracing::error!(error = %e, "the reflection guard cannot be built; answers are refused");
                Self {
                    finder: None,
                    starts: None,
                    longest,
                    unbuildable: true,
                }
            }
        }
    }

    /// Whether there is nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.finder.is_none() && !self.unbuildable
    }

    fn longest(&self) -> usize {
        self.longest
    }

    /// Whether `bytes` contain any piece, in any of its forms, in any ASCII case.
    pub fn found_in(&self, bytes: &[u8]) -> bool {
        self.found_lowered(bytes, &mut Vec::new())
    }

    /// [`Self::found_in`], lowering `bytes` into `lowered` (whose earlier content is dropped),
    /// so that a caller checking many short texts lowers them all in one allocation.
    fn found_lowered(&self, bytes: &[u8], lowered: &mut Vec<u8>) -> bool {
        if self.unbuildable {
            return true;
        }
        let Some(finder) = &self.finder else {
            return false;
        };
        lowered.clear();
        lowered.extend(bytes.iter().map(u8::to_ascii_lowercase));
        finder.is_match(lowered.as_slice())
    }

    /// Whether some suffix of `tail` (with no piece in it) is the start of a piece: then the
    /// next part could complete one, and `tail` must wait for it.
    fn may_start_one(&self, tail: &[u8]) -> bool {
        let Some(finder) = &self.starts else {
            return self.unbuildable;
        };
        let Ok(mut state) = finder.start_state(Anchored::No) else {
            return true;
        };
        for &byte in tail {
            state = finder.next_state(Anchored::No, state, byte);
        }
        // Back at the start: no piece has begun in the tail.
        !finder.is_start(state)
    }

    /// Whether any header, by its name or its value, contains any piece.
    pub fn found_in_headers(&self, headers: &HeaderMap) -> bool {
        let mut lowered = Vec::new();
        headers.iter().any(|(name, value)| {
            self.found_lowered(name.as_str().as_bytes(), &mut lowered)
                || self.found_lowered(value.as_bytes(), &mut lowered)
        })
    }
}

/// How the lowered pieces are searched for. aho-corasick's SIMD searcher for a few dozen
/// patterns (Teddy) where the CPU has it: a 1 KiB answer in about 0.1 µs, and about 1 µs for
/// a text made to start a piece at every byte; else a DFA, 2 µs per KiB whatever the text.
/// Not `AhoCorasick` with its own prefilter: for some credentials (hex-heavy cookies) it picks
/// a byte prefilter that fires on ordinary text, and a JSON answer took 6 µs per KiB
/// (BENCHMARKS.md, reflection guard).
enum Finder {
    Packed(aho_corasick::packed::Searcher),
    Automaton(aho_corasick::AhoCorasick),
}

impl Finder {
    fn new(needles: &[Vec<u8>]) -> Result<Self, aho_corasick::BuildError> {
        let packed = aho_corasick::packed::Config::new()
            .builder()
            .extend(needles)
            .build();
        match packed {
            Some(searcher) => Ok(Self::Packed(searcher)),
            None => aho_corasick::AhoCorasick::builder()
                .kind(Some(aho_corasick::AhoCorasickKind::DFA))
                .prefilter(false)
                .build(needles)
                .map(Self::Automaton),
        }
    }

    fn is_match(&self, lowered: &[u8]) -> bool {
        match self {
            Self::Packed(searcher) => searcher.find(lowered).is_some(),
            Self::Automaton(automaton) => automaton.is_match(lowered),
        }
    }
}

/// Whole messages (a WebSocket's) checked as one stream: a piece split between two messages is
/// found as in one. A message cannot be held back as a body's tail is ([`GuardedBody`]), so the
/// end of what went before is kept to be searched with the next.
pub struct Echoes {
    secrets: Secrets,
    /// The end of what was sent before, as long as a piece could reach back into it.
    tail: Vec<u8>,
}

impl Echoes {
    pub fn new(secrets: Secrets) -> Self {
        Self {
            secrets,
            tail: Vec::new(),
        }
    }

    /// Whether `message`, or it following what came before, carries a piece.
    pub fn found_in(&mut self, message: &[u8]) -> bool {
        if self.secrets.is_empty() {
            return false;
        }
        if self.secrets.found_in(message) {
            return true;
        }
        let reach = self.secrets.longest().saturating_sub(1);
        let mut joined = std::mem::take(&mut self.tail);
        joined.extend_from_slice(&message[..message.len().min(reach)]);
        if self.secrets.found_in(&joined) {
            return true;
        }
        if message.len() >= reach {
            joined.clear();
            joined.extend_from_slice(&message[message.len() - reach..]);
        } else {
            let drop = joined.len().saturating_sub(reach);
            joined.drain(..drop);
        }
        self.tail = joined;
        false
    }
}

/// The [`Secrets`] of injected credentials, by the SHA-256 of the injected value: building one
/// costs more than a request's whole decision path, and a credential is injected again and
/// again. Bounded; the key is a digest, never the secret.
pub struct SecretsCache(quick_cache::sync::Cache<[u8; 32], Secrets>);

impl std::fmt::Debug for SecretsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsCache(<redacted>)")
    }
}

impl Default for SecretsCache {
    fn default() -> Self {
        Self(quick_cache::sync::Cache::new(SECRETS_CACHE_CAPACITY))
    }
}

/// Credentials whose [`Secrets`] are kept built.
const SECRETS_CACHE_CAPACITY: usize = 4096;

impl SecretsCache {
    /// The secrets of the credential injected as `value`.
    pub fn of(&self, value: &[u8]) -> Secrets {
        self.of_all(&[value])
    }

    /// The secrets of the credentials injected as `values`.
    pub fn of_all(&self, values: &[&[u8]]) -> Secrets {
        use sha2::Digest as _;
        let mut digest = sha2::Sha256::new();
        for value in values {
            // Length-prefixed: no two lists of values share a key.
            digest.update((value.len() as u64).to_be_bytes());
            digest.update(value);
        }
        let key: [u8; 32] = digest.finalize().into();
        self.0
            .get_or_insert_with(&key, || {
                Ok::<_, std::convert::Infallible>(Secrets::of_all(values))
            })
            .unwrap_or_else(|never| match never {})
    }
}

/// The error a [`GuardedBody`] ends with when the answer carries a secret.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's answer carries the injected credential; it was cut off")]
pub struct CredentialReflected;

/// An upstream body passed on part by part, except that a part's end that could start a secret
/// (at most `longest piece - 1` bytes) is held until the next part (or the end) shows that no
/// secret runs across the boundary.
pub struct GuardedBody<B> {
    inner: B,
    secrets: Secrets,
    /// Bytes not yet passed on: at most `longest piece - 1` of them between parts.
    held: Vec<u8>,
    /// Set once a secret was seen or the inner body ended: nothing more is read.
    done: bool,
    /// The inner body's trailers, passed on after the held bytes.
    trailers: Option<HeaderMap>,
    /// The inner body's error, passed on after the held bytes.
    failed: Option<axum::BoxError>,
    /// Called once when a secret is seen (logging and auditing are the gateway's).
    on_reflected: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<B> GuardedBody<B> {
    /// Guards `inner` against `secrets`; `on_reflected` runs if one is found.
    pub fn new(
        inner: B,
        secrets: Secrets,
        on_reflected: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            secrets,
            held: Vec::new(),
            done: false,
            trailers: None,
            failed: None,
            on_reflected: Some(Box::new(on_reflected)),
        }
    }

    fn reflected(&mut self) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        self.done = true;
        self.held.clear();
        self.trailers = None;
        if let Some(report) = self.on_reflected.take() {
            report();
        }
        Poll::Ready(Some(Err(Box::new(CredentialReflected))))
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if let Some(error) = this.failed.take() {
                return Poll::Ready(Some(Err(error)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    // Nothing more comes, so what was held cannot be the start of a secret:
                    // it goes first, then the error.
                    this.done = true;
                    if this.held.is_empty() {
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    this.failed = Some(e.into());
                    let rest = std::mem::take(&mut this.held);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    this.done = true;
                    if this.held.is_empty() {
                        return Poll::Ready(None);
                    }
                    let rest = std::mem::take(&mut this.held);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    // Trailers end the body: what was held goes first, then they do.
                    if let Ok(trailers) = frame.into_trailers() {
                        if this.secrets.found_in_headers(&trailers) {
                            return this.reflected();
                        }
                        this.trailers = Some(trailers);
                    }
                    this.done = true;
                    if this.held.is_empty() {
                        continue;
                    }
                    let rest = std::mem::take(&mut this.held);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
            };
            let mut window = std::mem::take(&mut this.held);
            window.extend_from_slice(&data);
            if this.secrets.found_in(&window) {
                return this.reflected();
            }
            let most = this.secrets.longest().saturating_sub(1).min(window.len());
            let keep = if this.secrets.may_start_one(&window[window.len() - most..]) {
                most
            } else {
                0
            };
            this.held = window.split_off(window.len() - keep);
            if !window.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(window)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers.is_none()
            && self.failed.is_none()
            && self.held.is_empty()
            && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // The same bytes pass, only regrouped: the length stays exact.
        let inner = self.inner.size_hint();
        let held = self.held.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(held));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    /// A body of `parts`, one frame each, as an upstream sends them.
    struct Parts(std::collections::VecDeque<&'static [u8]>);

    impl Body for Parts {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|p| Ok(Frame::data(Bytes::from_static(p)))),
            )
        }
    }

    /// `hello`, then an error: an upstream that stalled after its first part.
    struct HelloThenFails(u8);

    impl Body for HelloThenFails {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0 += 1;
            Poll::Ready(Some(match self.0 {
                1 => Ok(Frame::data(Bytes::from_static(b"hello"))),
                _ => Err(std::io::Error::other("stalled")),
            }))
        }
    }

    #[tokio::test]
    async fn what_was_held_is_passed_on_before_the_inner_error() {
        let mut body = GuardedBody::new(
            HelloThenFails(0),
            Secrets::of(b"session=HUMAN-SECRET-123"),
            || {},
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(&first.into_data().unwrap()[..], b"hello");
        assert!(!body.is_end_stream());
        assert!(body.frame().await.unwrap().is_err());
    }

    fn chunks(parts: &[&'static [u8]]) -> Parts {
        Parts(parts.iter().copied().collect())
    }

    #[test]
    fn pieces_are_the_value_the_token_and_each_cookie_value() {
        let cookie = Secrets::of(b"session=HUMAN-SECRET-123; theme=dark; csrf=0123456789");
        assert!(cookie.found_in(b"{\"session\":\"HUMAN-SECRET-123\"}"));
        assert!(cookie.found_in(b"csrf=0123456789"));
        assert!(
            !cookie.found_in(b"theme=dark"),
            "short values are ordinary text"
        );
        let bearer = Secrets::of(b"Bearer tok_abcdefghijkl");
        assert!(bearer.found_in(b"your token is tok_abcdefghijkl"));
        assert!(Secrets::of(b"short").is_empty());
        // Case changed, hex, base64 at any alignment, a header's name.
        assert!(cookie.found_in(b"human-secret-123"));
        // Any ASCII case of any form: the search lowers both sides.
        let mixed = Secrets::of(b"Bearer tOk_AbCdEfGhIjKl");
        assert!(mixed.found_in(b"echo: TOK_aBcDeFgHiJkL!"));
        assert!(mixed.found_in(hex::encode("tOk_AbCdEfGhIjKl").to_uppercase().as_bytes()));
        {
            use base64::Engine as _;
            let encoded =
                base64::engine::general_purpose::STANDARD_NO_PAD.encode("tOk_AbCdEfGhIjKl");
            assert!(mixed.found_in(encoded.to_lowercase().as_bytes()));
            assert!(mixed.found_in(encoded.to_uppercase().as_bytes()));
        }
        assert!(!mixed.found_in(b"tok_abcdefghij-l"));
        // Past the SIMD searcher's 128 patterns the pieces are searched by a DFA: the same.
        let jar: String = (0..24)
            .map(|i| format!("c{i}=Cookie-Value-Number-{i:02}; "))
            .collect();
        let many = Secrets::of(jar.as_bytes());
        assert!(matches!(many.finder.as_deref(), Some(Finder::Automaton(_))));
        assert!(many.found_in(b"..COOKIE-value-number-17.."));
        assert!(!many.found_in(b"cookie-value-number-99"));
        assert!(matches!(mixed.finder.as_deref(), Some(Finder::Packed(_))));
        assert!(cookie.found_in(hex::encode("HUMAN-SECRET-123").as_bytes()));
        for prefix in ["", "a", "ab"] {
            use base64::Engine as _;
            let text = format!("{prefix}session=HUMAN-SECRET-123 and more");
            let encoded = base64::engine::general_purpose::STANDARD.encode(text);
            assert!(cookie.found_in(encoded.as_bytes()), "{prefix:?}: {encoded}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::HeaderName::from_static("x-human-secret-123"),
            axum::http::HeaderValue::from_static("1"),
        );
        assert!(cookie.found_in_headers(&headers));
    }

    /// An event stream through a guarded answer: a part that cannot begin a secret goes on at
    /// once, whole; one ending in what could begin the secret waits for the next part.
    #[tokio::test]
    async fn only_an_end_that_could_start_a_secret_is_held() {
        let secrets = Secrets::of(b"session=HUMAN-SECRET-123");
        let mut events = GuardedBody::new(
            chunks(&[b"data: {\"progress\": 1}\n\n", b"data: HUMAN-", b"ok\n\n"]),
            secrets,
            || {},
        );
        let first = events.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(
            &first[..],
            b"data: {\"progress\": 1}\n\n",
            "the event was held back"
        );
        // `data: HUMAN-` could go on as the secret: none of it is passed on before the next
        // part shows it does not.
        let second = events.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&second[..], b"data: HUMAN-ok\n\n");
        assert!(events.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_clean_body_passes_whole_and_a_secret_split_across_parts_is_caught() {
        let secrets = Secrets::of(b"session=HUMAN-SECRET-123");
        let clean = GuardedBody::new(chunks(&[b"hello ", b"wor", b"ld"]), secrets.clone(), || {});
        let bytes = clean.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello world");

        let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = seen.clone();
        let mut split = GuardedBody::new(
            chunks(&[b"prefix HUMAN-SE", b"CRET-123 suffix"]),
            secrets,
            move || flag.store(true, std::sync::atomic::Ordering::SeqCst),
        );
        let mut passed = Vec::new();
        let mut failed = false;
        while let Some(frame) = split.frame().await {
            match frame {
                Ok(frame) => passed.extend_from_slice(&frame.into_data().unwrap()),
                Err(e) => {
                    assert!(e.is::<CredentialReflected>());
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed && seen.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            !String::from_utf8_lossy(&passed).contains("HUMAN"),
            "a prefix of the secret was passed on: {passed:?}"
        );
    }

    #[test]
    fn an_echo_split_between_messages_is_found() {
        let secret = b"session=s3cr3t-value-of-the-human";
        let mut echoes = Echoes::new(Secrets::of(secret));
        assert!(!echoes.found_in(b"hello"));
        assert!(!echoes.found_in(b"your cookie is session=s3cr3t-"));
        assert!(echoes.found_in(b"value-of-the-human, thanks"));

        let mut echoes = Echoes::new(Secrets::of(secret));
        for byte in b"xx s3cr3t-value-of-the-human" {
            if echoes.found_in(&[*byte]) {
                return;
            }
        }
        panic!("an echo sent a byte per message was not found");
    }

    #[test]
    fn messages_without_the_credential_pass() {
        let mut echoes = Echoes::new(Secrets::of(b"session=s3cr3t-value-of-the-human"));
        for message in [&b"s3cr3t"[..], b"-valu", b"e", b"nothing", b"of-the-human"] {
            assert!(!echoes.found_in(message));
        }
        let mut none = Echoes::new(Secrets::default());
        assert!(!none.found_in(b"session=s3cr3t-value-of-the-human"));
    }
}
