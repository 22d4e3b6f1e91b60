//! Pure logic of Leash: JOSE (JWK, JWS), DPoP proofs, client assertions, access-token claims,
//! grants and scopes, strict JSON and MCP messages. No I/O: the clock and randomness are passed
//! in by the caller.

pub mod aead;
pub mod assertion;
pub mod audit;
pub mod b64;
pub mod client;
pub mod clock;
pub mod dpop;
pub mod grant;
pub mod json;
pub mod jwk;
pub mod jws;
pub mod mcp;
pub mod route;
pub mod secret;
pub mod token;

pub use clock::{Clock, FixedClock, SystemClock, UnixTime};
pub use jws::JoseError;
