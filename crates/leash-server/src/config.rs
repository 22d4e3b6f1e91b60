//! The one typed configuration, and the one place that combines its sources with the
//! precedence flags > environment > file > defaults (API §12).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use leash_core::secret::Secret;
use serde::Deserialize;

/// Environment variable: listen address.
pub const ENV_LISTEN: &str = "LEASH_LISTEN";
/// Environment variable: database URL.
pub const ENV_DATABASE: &str = "LEASH_DATABASE";
/// Environment variable: data directory.
pub const ENV_DATA_DIR: &str = "LEASH_DATA_DIR";
/// Environment variable: issuer URL.
pub const ENV_ISSUER: &str = "LEASH_ISSUER";
/// Environment variable: external base URL used for DPoP `htu` at resources.
pub const ENV_PUBLIC_URL: &str = "LEASH_PUBLIC_URL";
/// Environment variable: config file path.
pub const ENV_CONFIG: &str = "LEASH_CONFIG";
/// Environment variable: the admin API key (otherwise generated and printed once).
pub const ENV_ADMIN_TOKEN: &str = "LEASH_ADMIN_TOKEN";
/// Environment variable: base64 of the 32-byte vault master key.
pub const ENV_MASTER_KEY: &str = "LEASH_MASTER_KEY";
/// Environment variable: a key a proxy presents to `POST /v1/authorize` (`Leash-Proxy-Key`),
/// in addition to the digests in `[authorize] proxy_keys`.
pub const ENV_AUTHORIZE_KEY: &str = "LEASH_AUTHORIZE_KEY";
/// Environment variable: log filter (tracing `EnvFilter` syntax) for `leash serve`.
pub const ENV_LOG: &str = "LEASH_LOG";

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./.leash";

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape (unknown keys included).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid setting `{key}`: {message}")]
    Invalid {
        /// The setting.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The config file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    issuer: Option<String>,
    public_url: Option<String>,
    listen: Option<String>,
    database: Option<String>,
    data_dir: Option<PathBuf>,
    max_token_ttl: Option<i64>,
    jwks_max_age: Option<i64>,
    max_grant_ttl: Option<i64>,
    approval_ttl: Option<i64>,
    max_pending_approvals: Option<u32>,
    approval_preview_bytes: Option<usize>,
    policy_dir: Option<PathBuf>,
    dpop_nonce: Option<bool>,
    #[serde(default)]
    upstream: Vec<UpstreamFile>,
    approvals: Option<ApprovalsFile>,
    limits: Option<LimitsFile>,
    authorize: Option<AuthorizeFile>,
    mcp: Option<McpFile>,
    keys: Option<KeysFile>,
    proxy: Option<ProxyFile>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    oidc: Option<OidcFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OidcFile {
    issuer: String,
    client_id: String,
    client_secret_env: Option<String>,
    scopes: Option<Vec<String>>,
    #[serde(default)]
    admin_groups: Vec<String>,
    allowed_groups: Option<Vec<String>>,
    audience: Option<String>,
    session_ttl: Option<i64>,
    session_idle: Option<i64>,
}

/// Environment variable holding the OIDC client secret unless `[oidc] client_secret_env` names
/// another.
pub const ENV_OIDC_CLIENT_SECRET: &str = "LEASH_OIDC_CLIENT_SECRET";

/// Human login through the company's IdP (API §13), `[oidc]`.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// The IdP's issuer; discovery is `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// Leash's client id at the IdP.
    pub client_id: String,
    /// Leash's client secret at the IdP (from the environment, never the file).
    pub client_secret: Secret,
    /// Scopes asked for at login; `openid` always among them.
    pub scopes: Vec<String>,
    /// ID-token `groups` values that make a human an admin.
    pub admin_groups: Vec<String>,
    /// When set, only humans in one of these groups may log in.
    pub allowed_groups: Option<Vec<String>>,
    /// The `aud` an IdP access token must carry to be accepted as a Bearer token; none → IdP
    /// tokens are not accepted.
    pub audience: Option<String>,
    /// A session's absolute lifetime, seconds.
    pub session_ttl: i64,
    /// How long a session may go unused, seconds.
    pub session_idle: i64,
}

fn oidc(
    file: Option<OidcFile>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<OidcConfig>, ConfigError> {
    let Some(file) = file else {
        return Ok(None);
    };
    let issuer = base_url("oidc.issuer", file.issuer)?;
    if file.client_id.is_empty() {
        return Err(invalid("oidc.client_id", "must not be empty"));
    }
    let secret_env = file
        .client_secret_env
        .unwrap_or_else(|| ENV_OIDC_CLIENT_SECRET.to_owned());
    let client_secret = env(&secret_env).filter(|s| !s.is_empty()).ok_or_else(|| {
        invalid(
            "oidc.client_secret_env",
            format!("set the client secret in the environment variable {secret_env}"),
        )
    })?;
    let mut scopes = file
        .scopes
        .unwrap_or_else(|| vec!["openid".into(), "email".into(), "profile".into()]);
    if !scopes.iter().any(|s| s == "openid") {
        scopes.insert(0, "openid".into());
    }
    if let Some(audience) = &file.audience
        && *audience == file.client_id
    {
        // ID tokens carry the client id as `aud`: with this audience they would pass as
        // access tokens.
        return Err(invalid(
            "oidc.audience",
            "must differ from client_id (ID tokens are never accepted as Bearer tokens)",
        ));
    }
    Ok(Some(OidcConfig {
        issuer,
        client_id: file.client_id,
        client_secret: Secret::new(client_secret),
        scopes,
        admin_groups: file.admin_groups,
        allowed_groups: file.allowed_groups,
        audience: file.audience,
        session_ttl: positive("oidc.session_ttl", file.session_ttl, 8 * 3600)?,
        session_idle: positive("oidc.session_idle", file.session_idle, 3600)?,
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeFile {
    #[serde(default)]
    proxy_keys: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    header_read_timeout: Option<i64>,
    max_connections: Option<usize>,
    gateway_body_bytes: Option<usize>,
    upstream_timeout: Option<i64>,
    token_rate: Option<u32>,
    token_burst: Option<u32>,
    gateway_rate: Option<u32>,
    gateway_burst: Option<u32>,
    unauthenticated_rate: Option<u32>,
    unauthenticated_burst: Option<u32>,
    body_read_timeout: Option<i64>,
    max_connections_per_address: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    name: String,
    url: String,
    /// `"http"` (default) or `"mcp"`.
    kind: Option<String>,
    #[serde(default)]
    route: Vec<RouteFile>,
    #[serde(default)]
    tool: Vec<ToolFile>,
    unlisted_tools: Option<String>,
    inject: Option<InjectFile>,
    oauth: Option<OAuthFile>,
    /// The host names a browser navigates to, for the forward proxy (API §16).
    #[serde(default)]
    hosts: Vec<String>,
    /// A PEM file of the CA certificates the upstream's TLS is verified with, in place of
    /// Mozilla's roots (an internal CA).
    ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OAuthFile {
    issuer: Option<String>,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
    client_id: String,
    client_secret_env: Option<String>,
    client_auth: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectFile {
    kind: String,
    audience: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolFile {
    name: String,
    action: Option<String>,
    risk: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    rotate_every: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyFile {
    listen: String,
    approval_wait: Option<i64>,
}

/// `[proxy]` (API §16): the forward proxy for browser agents.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Its own listener.
    pub listen: SocketAddr,
    /// How long a request that needs approval is held open while the human decides.
    pub approval_wait: std::time::Duration,
}

/// A host name a browser navigates to (`hosts`): a DNS name of letters, digits and hyphens,
/// lower case, no wildcard, no IP address (the proxy CA's name constraints name DNS names
/// only, and exclude every address).
fn proxy_host(key: &str, host: &str) -> Result<String, ConfigError> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    // A last label that is a number (decimal, octal or `0x` hex) makes a browser's URL parser
    // read the whole name as an IPv4 address (WHATWG URL): `0x7f000001`, `127.1`, `a.123`.
    let last = host.rsplit('.').next().unwrap_or_default();
    let numeric = |label: &str| {
        let hex = label
            .strip_prefix("0x")
            .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()));
        hex || (!label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()))
    };
    let is_address = host.parse::<std::net::IpAddr>().is_ok() || numeric(last);
    if host.len() > 253 || is_address || !host.split('.').all(label_ok) {
        return Err(invalid(
            key,
            format!(
                "hosts: {host:?} must be a DNS name in lower case (no wildcard, no IP address)"
            ),
        ));
    }
    Ok(host.to_owned())
}

/// A duration written `30d`, `12h`, `15m` or `90s`.
fn duration(key: &str, text: &str) -> Result<std::time::Duration, ConfigError> {
    let bad = || {
        invalid(
            key,
            "write a duration as a positive number with d, h, m or s (30d, 12h)",
        )
    };
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "d" => number.checked_mul(86_400),
        "h" => number.checked_mul(3_600),
        "m" => number.checked_mul(60),
        "s" => Some(number),
        _ => None,
    }
    .filter(|&s| s > 0)
    .ok_or_else(bad)?;
    Ok(std::time::Duration::from_secs(seconds))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct McpFile {
    approval_wait: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    method: String,
    path: String,
    action: String,
    risk: Option<String>,
    #[serde(default)]
    websocket: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalsFile {
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
}

/// Values given on the command line.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--database`.
    pub database: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
}

/// How risky an action is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    /// Ordinary.
    Normal,
    /// Needs a human approval unless policy says otherwise.
    High,
}

/// One route of an upstream.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Route {
    /// HTTP method, upper case, or `*` for any.
    pub method: String,
    /// Path pattern: `*` one segment, `**` any number.
    pub path: String,
    /// The action it names, `app:verb`.
    pub action: String,
    /// Its risk.
    pub risk: Risk,
    /// Whether a browser may open a WebSocket on it through the forward proxy (API §16): the
    /// upgrade is judged as one request of this route's action, and the socket then lives
    /// until either side closes it or the grant ends.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub websocket: bool,
}

/// An application behind the gateway.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Upstream {
    /// Its name in `/gw/{name}/…` (or `/mcp/{name}`) and in grants.
    pub name: String,
    /// Base URL requests are forwarded to (an MCP upstream's: its MCP endpoint).
    pub url: url::Url,
    /// Routes in order; the first match names the action.
    pub routes: Vec<Route>,
    /// The routes compiled once at start: index into `routes`.
    #[serde(skip)]
    pub table: leash_core::route::RouteTable<usize>,
    /// Set for an MCP server (`kind = "mcp"`, API §14), reached at `/mcp/{name}` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpServer>,
    /// `[upstream.inject] kind = "leash_token"` (API §17): the upstream gets a delegation token
    /// Leash signs per request for this audience, in place of a vaulted credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegation_audience: Option<String>,
    /// The host names a browser reaches this upstream by through the forward proxy (API §16).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// `ca_file`: the CA certificates its TLS is verified with, in place of Mozilla's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// `[upstream.oauth]` (API §17): humans connect their account at the upstream's OAuth
    /// server, and Leash injects the access token it keeps fresh.
    #[serde(skip)]
    pub oauth: Option<UpstreamOAuth>,
}

/// How Leash authenticates to an upstream's OAuth server's token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic` (the default).
    Basic,
    /// `client_secret_post`.
    Post,
}

/// The endpoints of an upstream's OAuth server, when configured rather than discovered.
#[derive(Debug, Clone)]
pub struct OAuthEndpoints {
    /// Where the human is sent to authorize Leash.
    pub authorization: url::Url,
    /// Where codes and refresh tokens are exchanged.
    pub token: url::Url,
    /// RFC 7009, where `DELETE /v1/vault/{upstream}` revokes the tokens, if offered.
    pub revocation: Option<url::Url>,
}

/// `[upstream.oauth]`: Leash as an OAuth client of the upstream's authorization server.
#[derive(Debug, Clone)]
pub struct UpstreamOAuth {
    /// The server's issuer: discovery (RFC 8414, then OpenID) when `endpoints` is not given,
    /// and the RFC 9207 `iss` its authorization responses must name.
    pub issuer: Option<String>,
    /// The endpoints, when configured.
    pub endpoints: Option<OAuthEndpoints>,
    /// Leash's client id there.
    pub client_id: String,
    /// Leash's client secret there (from the environment); none for a public client.
    pub client_secret: Option<Secret>,
    /// How the secret is sent.
    pub client_auth: ClientAuth,
    /// Scopes asked for.
    pub scopes: Vec<String>,
}

fn upstream_oauth(
    key: &str,
    file: OAuthFile,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<UpstreamOAuth, ConfigError> {
    let key = format!("{key}.oauth");
    let endpoint = |name: &str, value: String| -> Result<url::Url, ConfigError> {
        let url = url::Url::parse(&value).map_err(|e| invalid(&key, format!("{name}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.fragment().is_some() {
            return Err(invalid(&key, format!("{name} must be an http(s) URL")));
        }
        Ok(url)
    };
    let issuer = file
        .issuer
        .map(|issuer| base_url(&format!("{key}.issuer"), issuer))
        .transpose()?;
    let endpoints = match (file.authorization_endpoint, file.token_endpoint) {
        (Some(authorization), Some(token)) => Some(OAuthEndpoints {
            authorization: endpoint("authorization_endpoint", authorization)?,
            token: endpoint("token_endpoint", token)?,
            revocation: file
                .revocation_endpoint
                .map(|r| endpoint("revocation_endpoint", r))
                .transpose()?,
        }),
        (None, None) if issuer.is_some() => {
            if file.revocation_endpoint.is_some() {
                return Err(invalid(
                    &key,
                    "revocation_endpoint goes with authorization_endpoint and token_endpoint; with issuer alone it is discovered",
                ));
            }
            None
        }
        _ => {
            return Err(invalid(
                &key,
                "give issuer (discovery), or authorization_endpoint and token_endpoint",
            ));
        }
    };
    if file.client_id.is_empty() {
        return Err(invalid(&key, "client_id must not be empty"));
    }
    let client_secret = file
        .client_secret_env
        .map(|name| {
            env(&name)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .ok_or_else(|| {
                    invalid(
                        &key,
                        format!("set the client secret in the environment variable {name}"),
                    )
                })
        })
        .transpose()?;
    let client_auth = match file.client_auth.as_deref() {
        None | Some("client_secret_basic") => ClientAuth::Basic,
        Some("client_secret_post") => ClientAuth::Post,
        Some(other) => {
            return Err(invalid(
                &key,
                format!("client_auth {other:?}: use client_secret_basic or client_secret_post"),
            ));
        }
    };
    if let Some(scope) = file.scopes.iter().find(|s| {
        s.is_empty()
            || !s
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    }) {
        return Err(invalid(
            &key,
            format!("scope {scope:?} is not a scope token"),
        ));
    }
    Ok(UpstreamOAuth {
        issuer,
        endpoints,
        client_id: file.client_id,
        client_secret,
        client_auth,
        scopes: file.scopes,
    })
}

impl Upstream {
    /// The route naming the action of `method` on a safe path's `segments`.
    pub fn route(&self, method: &str, segments: &[&str]) -> Option<&Route> {
        self.table
            .find(method, segments)
            .and_then(|&i| self.routes.get(i))
    }

    /// The actions its routes (or an MCP server's tools, resources and prompts) define.
    pub fn actions(&self) -> BTreeSet<&str> {
        let mut actions: BTreeSet<&str> = self.routes.iter().map(|r| r.action.as_str()).collect();
        if let Some(mcp) = &self.mcp {
            actions.extend(mcp.tools.iter().map(|t| t.action.as_str()));
            actions.insert(&mcp.resources_action);
            actions.insert(&mcp.prompts_action);
            actions.insert(&mcp.sampling_action);
        }
        actions
    }

    /// Whether a grant of this upstream may name `action`: one of [`Self::actions`], or an
    /// unlisted tool's when the MCP server lets them through.
    pub fn defines(&self, action: &str) -> bool {
        match &self.mcp {
            Some(server) => server.defines(action),
            None => self.routes.iter().any(|r| r.action == action),
        }
    }
}

/// What Leash knows of an MCP server's tools: only what the operator configured (a server's own
/// tool annotations are never trusted for risk).
#[derive(Debug, Clone, serde::Serialize)]
pub struct McpServer {
    /// The upstream's name, the first half of an unlisted tool's action.
    pub upstream: String,
    /// The configured tools.
    pub tools: Vec<Tool>,
    /// `unlisted_tools`: `None` refuses (and hides) a tool the config does not list; `Some(risk)`
    /// gives it the action `<upstream>:<tool>` with that risk.
    pub unlisted: Option<Risk>,
    /// `<upstream>:resources`, the action of `resources/list` and `resources/read`.
    pub resources_action: String,
    /// `<upstream>:prompts`, the action of `prompts/list` and `prompts/get`.
    pub prompts_action: String,
    /// `<upstream>:sampling`: the server's `sampling/createMessage` reaches the agent only if
    /// its token holds this action and policy permits it.
    pub sampling_action: String,
    /// `<upstream>:elicitation`, the action an elicitation put to the human is shown under.
    pub elicitation_action: String,
}

impl McpServer {
    /// The tool named `name`: configured, or, when `unlisted_tools` lets them through, an
    /// unlisted one with the action `<upstream>:<name>`. An unlisted tool whose name does not
    /// make an action (`app:verb`, lower case), or makes one the config already gives to
    /// something else, is refused: `crm:delete` granted for a listed `delete_contact` must not
    /// also let through an unlisted tool called `delete`.
    pub fn tool(&self, name: &str) -> Option<Cow<'_, Tool>> {
        if let Some(tool) = self.tools.iter().find(|t| t.name == name) {
            return Some(Cow::Borrowed(tool));
        }
        let risk = self.unlisted?;
        let action = format!("{}:{name}", self.upstream);
        (valid_action(&action) && !self.names(&action)).then(|| {
            Cow::Owned(Tool {
                name: name.to_owned(),
                action,
                risk,
            })
        })
    }

    /// Whether the config gives `action` to a listed tool or it is one of the server's own.
    fn names(&self, action: &str) -> bool {
        self.tools.iter().any(|t| t.action == action) || self.own_actions().contains(&action)
    }

    /// The actions of resources, prompts, sampling and elicitations: never a tool's.
    fn own_actions(&self) -> [&str; 4] {
        [
            &self.resources_action,
            &self.prompts_action,
            &self.sampling_action,
            &self.elicitation_action,
        ]
    }

    /// Whether a grant may name `action` for this server: one the config names (not the
    /// elicitations', which no agent takes), or, with `unlisted_tools`, any other
    /// `<upstream>:<verb>` (an unlisted tool's).
    pub fn defines(&self, action: &str) -> bool {
        action != self.elicitation_action
            && (self.names(action)
                || (self.unlisted.is_some()
                    && valid_action(action)
                    && action
                        .strip_prefix(self.upstream.as_str())
                        .is_some_and(|rest| rest.starts_with(':'))))
    }
}

/// One tool of an MCP server.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tool {
    /// Its name in `tools/call`.
    pub name: String,
    /// The action it names (default `<upstream>:<tool name>`).
    pub action: String,
    /// Its risk.
    pub risk: Risk,
}

/// Webhook settings for approvals.
#[derive(Clone, Default)]
pub struct ApprovalsConfig {
    /// Where to POST new approvals.
    pub webhook_url: Option<url::Url>,
    /// HMAC key for `Leash-Signature`.
    pub webhook_secret: Option<leash_core::secret::Secret>,
}

impl std::fmt::Debug for ApprovalsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalsConfig")
            .field(
                "webhook_url",
                &self.webhook_url.as_ref().map(url::Url::as_str),
            )
            .field("webhook_secret", &self.webhook_secret)
            .finish()
    }
}

/// Who may call `POST /v1/authorize` (API §6): the proxies the operator configured, each by
/// the SHA-256 of its key. None configured: nobody may.
#[derive(Debug, Clone, Default)]
pub struct AuthorizeConfig {
    /// Digests of the accepted `Leash-Proxy-Key` values.
    pub proxy_keys: Vec<leash_core::secret::SecretDigest>,
}

impl AuthorizeConfig {
    /// Whether `key` is one of the configured proxy keys. Every configured digest is compared,
    /// each in constant time, so the answer's timing does not tell which one came close.
    pub fn accepts(&self, key: &str) -> bool {
        let presented = leash_core::secret::SecretDigest::of(key);
        self.proxy_keys
            .iter()
            .fold(false, |found, digest| digest.ct_eq(&presented) | found)
    }
}

/// Shortest `LEASH_AUTHORIZE_KEY` accepted: a proxy key must be as hard to guess as an API key
/// (128 bits as 32 hex digits).
const MIN_PROXY_KEY_LEN: usize = 32;

fn authorize(
    file: Option<AuthorizeFile>,
    env_key: Option<String>,
) -> Result<AuthorizeConfig, ConfigError> {
    let mut proxy_keys = Vec::new();
    for digest in file.map(|f| f.proxy_keys).unwrap_or_default() {
        let digest = digest.trim().to_ascii_lowercase();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                "authorize.proxy_keys",
                "each entry must be the SHA-256 of a key as 64 hex digits (printf %s \"$KEY\" | sha256sum)",
            ));
        }
        proxy_keys.push(leash_core::secret::SecretDigest::from_stored(digest));
    }
    if let Some(key) = env_key {
        if key.len() < MIN_PROXY_KEY_LEN || key.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(invalid(
                ENV_AUTHORIZE_KEY,
                format!(
                    "must be at least {MIN_PROXY_KEY_LEN} visible ASCII characters (e.g. openssl rand -hex 32)"
                ),
            ));
        }
        proxy_keys.push(leash_core::secret::SecretDigest::of(&key));
    }
    Ok(AuthorizeConfig { proxy_keys })
}

/// A per-caller rate: `per_second` sustained with bursts of `burst`; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: std::num::NonZeroU32,
    /// Requests allowed at once after a quiet spell.
    pub burst: std::num::NonZeroU32,
}

/// What one connection and one caller may ask of the server (`[limits]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head (request line and headers), bytes; larger → 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request; more → 431.
    pub max_headers: usize,
    /// Time a client has to send a request head, and the longest a kept-alive connection may
    /// idle between requests, before the connection is closed.
    pub header_read_timeout: std::time::Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request body forwarded through the gateway; larger → 413.
    pub gateway_body_bytes: usize,
    /// Time an upstream has to start its answer once a request is forwarded (longer → 504), and
    /// then between two parts of it (longer → the answer is cut off).
    pub upstream_timeout: std::time::Duration,
    /// Token requests per authenticated agent.
    pub token_rate: Option<Rate>,
    /// Gateway and `/v1/authorize` requests per authenticated caller.
    pub gateway_rate: Option<Rate>,
    /// Gateway and `/v1/authorize` refusals of callers nobody could identify, per source
    /// address: each within it is audited; beyond it they get 429 and one summary event a
    /// minute counts them, so garbage cannot flood the audit log.
    pub unauthenticated_rate: Option<Rate>,
    /// Time a client has to send a whole request body outside the gateway (token, management
    /// and authorize calls, whose bodies are small): a body dripped in a byte at a time is cut
    /// off with 408 however steadily it arrives. Gateway bodies may be large and are only
    /// timed between parts (`header_read_timeout`).
    pub body_read_timeout: std::time::Duration,
    /// Connections one source address may hold at once; more are closed as they arrive, so
    /// one client cannot take every one of `max_connections`.
    pub max_connections_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let rate = |per_second, burst| {
            Some(Rate {
                per_second: std::num::NonZeroU32::new(per_second)?,
                burst: std::num::NonZeroU32::new(burst)?,
            })
        };
        Self {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_read_timeout: std::time::Duration::from_secs(10),
            max_connections: 1024,
            gateway_body_bytes: 16 * 1024 * 1024,
            upstream_timeout: std::time::Duration::from_secs(60),
            token_rate: rate(10, 20),
            gateway_rate: rate(100, 200),
            unauthenticated_rate: rate(20, 40),
            body_read_timeout: std::time::Duration::from_secs(10),
            max_connections_per_address: 1024 / 2,
        }
    }
}

/// Smallest header limit accepted: hyper needs an 8 KiB read buffer, and a DPoP request's
/// token and proof alone take a few KiB.
const MIN_HEADER_BYTES: usize = 4 * 1024;

fn limits(file: Option<LimitsFile>) -> Result<Limits, ConfigError> {
    let defaults = Limits::default();
    let Some(file) = file else {
        return Ok(defaults);
    };
    let rate = |key: &str, rate: Option<u32>, burst: Option<u32>, default: Option<Rate>| {
        let per_second = match (rate, default) {
            (Some(0), _) => return Ok(None),
            (Some(r), _) => r,
            (None, Some(d)) => d.per_second.get(),
            (None, None) => return Ok(None),
        };
        let burst = burst.unwrap_or(per_second.saturating_mul(2));
        match (
            std::num::NonZeroU32::new(per_second),
            std::num::NonZeroU32::new(burst),
        ) {
            (Some(per_second), Some(burst)) => Ok(Some(Rate { per_second, burst })),
            _ => Err(invalid(
                format!("limits.{key}_burst"),
                "must be at least 1 (set the rate to 0 to turn the limit off)",
            )),
        }
    };
    let max_header_bytes = file.max_header_bytes.unwrap_or(defaults.max_header_bytes);
    if !(MIN_HEADER_BYTES..=1024 * 1024).contains(&max_header_bytes) {
        return Err(invalid(
            "limits.max_header_bytes",
            format!("must be between {MIN_HEADER_BYTES} and 1048576"),
        ));
    }
    let max_headers = file.max_headers.unwrap_or(defaults.max_headers);
    if !(16..=1024).contains(&max_headers) {
        return Err(invalid("limits.max_headers", "must be between 16 and 1024"));
    }
    let max_connections = file.max_connections.unwrap_or(defaults.max_connections);
    if max_connections == 0 {
        return Err(invalid("limits.max_connections", "must be at least 1"));
    }
    // Half of all by default: one client never holds every connection, and a server with
    // one proxy in front still has most of them for it.
    let max_connections_per_address = file
        .max_connections_per_address
        .unwrap_or((max_connections / 2).max(1));
    if !(1..=max_connections).contains(&max_connections_per_address) {
        return Err(invalid(
            "limits.max_connections_per_address",
            "must be between 1 and max_connections",
        ));
    }
    let gateway_body_bytes = file
        .gateway_body_bytes
        .unwrap_or(defaults.gateway_body_bytes);
    Ok(Limits {
        max_header_bytes,
        max_headers,
        header_read_timeout: seconds(
            "limits.header_read_timeout",
            file.header_read_timeout,
            defaults.header_read_timeout,
        )?,
        max_connections,
        gateway_body_bytes,
        upstream_timeout: seconds(
            "limits.upstream_timeout",
            file.upstream_timeout,
            defaults.upstream_timeout,
        )?,
        token_rate: rate(
            "token",
            file.token_rate,
            file.token_burst,
            defaults.token_rate,
        )?,
        gateway_rate: rate(
            "gateway",
            file.gateway_rate,
            file.gateway_burst,
            defaults.gateway_rate,
        )?,
        unauthenticated_rate: rate(
            "unauthenticated",
            file.unauthenticated_rate,
            file.unauthenticated_burst,
            defaults.unauthenticated_rate,
        )?,
        body_read_timeout: seconds(
            "limits.body_read_timeout",
            file.body_read_timeout,
            defaults.body_read_timeout,
        )?,
        max_connections_per_address,
    })
}

/// The resolved configuration of `leash serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Issuer URL without a trailing slash; `None` until the listen address is known.
    pub issuer: Option<String>,
    /// External base URL for DPoP `htu` at resources; defaults to the issuer.
    pub public_url: Option<String>,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Database URL.
    pub database: String,
    /// Data directory (key files, default database).
    pub data_dir: PathBuf,
    /// Longest access-token lifetime, seconds.
    pub max_token_ttl: i64,
    /// The JWKS's `Cache-Control` max-age, seconds: a rotated key signs this long after it
    /// was published.
    pub jwks_max_age: i64,
    /// Longest grant lifetime, seconds.
    pub max_grant_ttl: i64,
    /// How long an approval waits, seconds.
    pub approval_ttl: i64,
    /// Approvals a grant may have pending at once; another ask → 429.
    pub max_pending_approvals: u32,
    /// Largest request body kept (sealed) for the human to see while an approval is pending
    /// (API §7); 0 keeps none.
    pub approval_preview_bytes: usize,
    /// Operator Cedar policies.
    pub policy_dir: Option<PathBuf>,
    /// Whether DPoP proofs must carry a server nonce.
    pub dpop_nonce: bool,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, Upstream>,
    /// Approval notifications.
    pub approvals: ApprovalsConfig,
    /// Connection, size and rate limits.
    pub limits: Limits,
    /// Who may call `/v1/authorize`.
    pub authorize: AuthorizeConfig,
    /// How long a `tools/call` that needs approval is held open while the human decides.
    pub mcp_approval_wait: std::time::Duration,
    /// Proxies whose `X-Forwarded-For` names the client for per-address limits.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Human login through an IdP, when configured.
    pub oidc: Option<OidcConfig>,
    /// `[keys] rotate_every`: a planned signing-key rotation once the newest key is this old;
    /// none (the default): only when asked.
    pub rotate_keys_every: Option<std::time::Duration>,
    /// `[proxy]`, when the forward proxy is on.
    pub proxy: Option<ProxyConfig>,
}

impl Config {
    /// The upstream a browser reaches at `host` through the proxy.
    pub fn upstream_by_host(&self, host: &str) -> Option<&Upstream> {
        self.upstreams
            .values()
            .find(|u| u.hosts.iter().any(|h| h == host))
    }

    /// Every host the proxy serves, sorted, each once.
    pub fn proxy_hosts(&self) -> Vec<String> {
        let hosts: std::collections::BTreeSet<&String> =
            self.upstreams.values().flat_map(|u| &u.hosts).collect();
        hosts.into_iter().cloned().collect()
    }
}

/// A positive number of seconds as a duration, `default` when unset.
/// The longest `proxy.approval_wait`: a browser's request held open for longer than an hour
/// is a connection nobody is waiting on any more.
const MAX_PROXY_APPROVAL_WAIT: i64 = 3600;

fn held_request_wait(value: Option<i64>) -> Result<std::time::Duration, ConfigError> {
    let key = "proxy.approval_wait";
    let wait = seconds(key, value, std::time::Duration::from_secs(120))?;
    if value.is_some_and(|v| v > MAX_PROXY_APPROVAL_WAIT) {
        return Err(invalid(
            key,
            format!("at most {MAX_PROXY_APPROVAL_WAIT} seconds"),
        ));
    }
    Ok(wait)
}

fn seconds(
    key: &str,
    value: Option<i64>,
    default: std::time::Duration,
) -> Result<std::time::Duration, ConfigError> {
    let default = i64::try_from(default.as_secs()).unwrap_or(i64::MAX);
    positive(key, value, default).map(|secs| std::time::Duration::from_secs(secs.unsigned_abs()))
}

fn positive(key: &str, value: Option<i64>, default: i64) -> Result<i64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if v > 0 => Ok(v),
        Some(_) => Err(invalid(key, "must be a positive number of seconds")),
    }
}

fn base_url(key: &str, value: String) -> Result<String, ConfigError> {
    let parsed = url::Url::parse(&value).map_err(|e| invalid(key, e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.query().is_some() {
        return Err(invalid(key, "must be an http(s) URL without a query"));
    }
    Ok(value.trim_end_matches('/').to_owned())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Whether `action` looks like `app:verb`.
pub fn valid_action(action: &str) -> bool {
    let mut parts = action.split(':');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if valid_name(a) && valid_name(b))
}

fn risk(key: &str, text: Option<&str>) -> Result<Risk, ConfigError> {
    match text {
        None | Some("normal") | Some("low") => Ok(Risk::Normal),
        Some("high") => Ok(Risk::High),
        Some(other) => Err(invalid(key, format!("risk {other:?}: use normal or high"))),
    }
}

/// An MCP upstream's tools (API §14): each names an action, by default `<upstream>:<tool>`.
fn mcp_server(key: &str, file: &mut UpstreamFile) -> Result<Option<McpServer>, ConfigError> {
    match file.kind.as_deref() {
        None | Some("http") => {
            if !file.tool.is_empty() || file.unlisted_tools.is_some() {
                return Err(invalid(key, "tools are for kind = \"mcp\" upstreams"));
            }
            return Ok(None);
        }
        Some("mcp") => {}
        Some(other) => return Err(invalid(key, format!("kind {other:?}: use http or mcp"))),
    }
    if !file.route.is_empty() {
        return Err(invalid(key, "an MCP upstream has tools, not routes"));
    }
    let unlisted = match file.unlisted_tools.as_deref() {
        None | Some("refuse") => None,
        Some("allow") => Some(Risk::Normal),
        Some("high") => Some(Risk::High),
        Some(other) => {
            return Err(invalid(
                key,
                format!("unlisted_tools = {other:?}: use refuse, allow or high"),
            ));
        }
    };
    let mut tools: Vec<Tool> = Vec::new();
    for tool in std::mem::take(&mut file.tool) {
        if tools.iter().any(|t| t.name == tool.name) {
            return Err(invalid(
                key,
                format!("tool {:?} is listed twice", tool.name),
            ));
        }
        let action = tool
            .action
            .unwrap_or_else(|| format!("{}:{}", file.name, tool.name));
        if !valid_action(&action) {
            return Err(invalid(
                key,
                format!(
                    "tool {:?}: action {action:?} must be app:verb (lower case); set `action` for this tool",
                    tool.name
                ),
            ));
        }
        tools.push(Tool {
            risk: risk(key, tool.risk.as_deref())?,
            name: tool.name,
            action,
        });
    }
    let server = McpServer {
        upstream: file.name.clone(),
        tools,
        unlisted,
        resources_action: format!("{}:resources", file.name),
        prompts_action: format!("{}:prompts", file.name),
        sampling_action: format!("{}:sampling", file.name),
        elicitation_action: format!("{}:elicitation", file.name),
    };
    let reserved = server.own_actions();
    if let Some(tool) = server
        .tools
        .iter()
        .find(|t| reserved.contains(&t.action.as_str()))
    {
        return Err(invalid(
            key,
            format!(
                "tool {:?}: action {:?} is the upstream's own (resources, prompts, sampling, elicitation); set another `action`",
                tool.name, tool.action
            ),
        ));
    }
    Ok(Some(server))
}

fn upstreams(
    files: Vec<UpstreamFile>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, Upstream>, ConfigError> {
    let mut out = BTreeMap::new();
    for mut file in files {
        let key = format!("upstream.{}", file.name);
        if !valid_name(&file.name) {
            return Err(invalid("upstream.name", "use 1-64 of a-z, 0-9, - and _"));
        }
        let url = url::Url::parse(&file.url).map_err(|e| invalid(&key, e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(&key, "url must be http or https"));
        }
        let mcp = mcp_server(&key, &mut file)?;
        let hosts = std::mem::take(&mut file.hosts)
            .iter()
            .map(|host| proxy_host(&key, host))
            .collect::<Result<Vec<_>, _>>()?;
        if mcp.is_some() && !hosts.is_empty() {
            return Err(invalid(
                &key,
                "an MCP upstream has no hosts (the proxy is for browsers)",
            ));
        }
        if let Some(taken) = hosts
            .iter()
            .find(|h| out.values().any(|u: &Upstream| u.hosts.contains(h)))
        {
            return Err(invalid(
                &key,
                format!("hosts: {taken:?} belongs to another upstream"),
            ));
        }
        let delegation_audience = match file.inject.take() {
            None => None,
            Some(inject) if inject.kind == "leash_token" => {
                let audience = inject.audience;
                if audience.is_empty()
                    || audience.len() > 512
                    || audience.chars().any(char::is_control)
                {
                    return Err(invalid(
                        &key,
                        "inject.audience must be 1-512 printable characters",
                    ));
                }
                if out
                    .values()
                    .any(|u: &Upstream| u.delegation_audience.as_ref() == Some(&audience))
                {
                    return Err(invalid(
                        &key,
                        format!(
                            "inject.audience {audience:?} is another upstream's: each must be unique"
                        ),
                    ));
                }
                Some(audience)
            }
            Some(inject) => {
                return Err(invalid(
                    &key,
                    format!(
                        "inject.kind {:?} is not one Leash knows (leash_token)",
                        inject.kind
                    ),
                ));
            }
        };
        let oauth = file
            .oauth
            .take()
            .map(|oauth| upstream_oauth(&key, oauth, env))
            .transpose()?;
        if oauth.is_some() && delegation_audience.is_some() {
            return Err(invalid(
                &key,
                "an upstream gets a delegation token or an OAuth connection's token, not both",
            ));
        }
        let mut routes = Vec::new();
        for route in file.route {
            let method = route.method.to_ascii_uppercase();
            if method != "*" && !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(invalid(
                    &key,
                    format!("route method {:?} is not a method", route.method),
                ));
            }
            if !route.path.starts_with('/') {
                return Err(invalid(
                    &key,
                    format!("route path {:?} must start with /", route.path),
                ));
            }
            if !valid_action(&route.action) {
                return Err(invalid(
                    &key,
                    format!("route action {:?} must be app:verb", route.action),
                ));
            }
            let risk = risk(&key, route.risk.as_deref())?;
            if route.websocket && method != "GET" {
                return Err(invalid(
                    &key,
                    format!(
                        "route {} {}: a websocket route must be GET (a WebSocket opens with GET)",
                        route.method, route.path
                    ),
                ));
            }
            routes.push(Route {
                method,
                path: route.path,
                action: route.action,
                risk,
                websocket: route.websocket,
            });
        }
        let table = leash_core::route::RouteTable::new(
            routes
                .iter()
                .enumerate()
                .map(|(i, r)| (r.method.as_str(), r.path.as_str(), i)),
        )
        .map_err(|e| invalid(&key, e.to_string()))?;
        if out
            .insert(
                file.name.clone(),
                Upstream {
                    name: file.name,
                    url,
                    routes,
                    table,
                    mcp,
                    delegation_audience,
                    hosts,
                    ca_file: file.ca_file,
                    oauth,
                },
            )
            .is_some()
        {
            return Err(invalid(key, "defined twice"));
        }
    }
    Ok(out)
}

impl Config {
    /// Reads the file named by `--config` or `LEASH_CONFIG` (if any) and combines it with the
    /// environment (`env` looks a variable up) and the flags.
    pub fn load(flags: &Flags, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let path = flags
            .config
            .clone()
            .or_else(|| env(ENV_CONFIG).map(PathBuf::from));
        let file = match &path {
            Some(path) => Self::read_file(path)?,
            None => FileConfig::default(),
        };
        let listen_text = flags
            .listen
            .clone()
            .or_else(|| env(ENV_LISTEN))
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("listen", format!("{listen_text:?} is not HOST:PORT")))?;
        let data_dir = flags
            .data_dir
            .clone()
            .or_else(|| env(ENV_DATA_DIR).map(PathBuf::from))
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database = flags
            .database
            .clone()
            .or_else(|| env(ENV_DATABASE))
            .or(file.database)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("leash.db").display()));
        let issuer = env(ENV_ISSUER)
            .or(file.issuer)
            .map(|v| base_url("issuer", v))
            .transpose()?;
        let public_url = env(ENV_PUBLIC_URL)
            .or(file.public_url)
            .map(|v| base_url("public_url", v))
            .transpose()?;
        let approvals = match file.approvals {
            None => ApprovalsConfig::default(),
            // Unsigned notifications could be forged by anyone who can reach the receiver.
            Some(ApprovalsFile {
                webhook_url: Some(_),
                webhook_secret: None,
            }) => {
                return Err(invalid(
                    "approvals.webhook_secret",
                    "is required with webhook_url (notifications are signed with it)",
                ));
            }
            Some(a) => ApprovalsConfig {
                webhook_url: a
                    .webhook_url
                    .map(|u| {
                        url::Url::parse(&u)
                            .map_err(|e| invalid("approvals.webhook_url", e.to_string()))
                    })
                    .transpose()?,
                webhook_secret: a.webhook_secret.map(leash_core::secret::Secret::new),
            },
        };
        Ok(Self {
            issuer,
            public_url,
            listen,
            database,
            data_dir,
            max_token_ttl: positive("max_token_ttl", file.max_token_ttl, 300)?,
            jwks_max_age: positive("jwks_max_age", file.jwks_max_age, 300)?,
            max_grant_ttl: positive("max_grant_ttl", file.max_grant_ttl, 8 * 3600)?,
            approval_ttl: positive("approval_ttl", file.approval_ttl, 15 * 60)?,
            approval_preview_bytes: file.approval_preview_bytes.unwrap_or(64 * 1024),
            max_pending_approvals: match file.max_pending_approvals {
                None => 5,
                Some(0) => return Err(invalid("max_pending_approvals", "must be at least 1")),
                Some(n) => n,
            },
            // A relative policy_dir in a file is relative to that file.
            policy_dir: file
                .policy_dir
                .map(|dir| match path.as_deref().and_then(Path::parent) {
                    Some(base) if dir.is_relative() => base.join(dir),
                    _ => dir,
                }),
            dpop_nonce: file.dpop_nonce.unwrap_or(false),
            upstreams: upstreams(file.upstream, &env)?,
            approvals,
            limits: limits(file.limits)?,
            authorize: authorize(file.authorize, env(ENV_AUTHORIZE_KEY))?,
            mcp_approval_wait: seconds(
                "mcp.approval_wait",
                file.mcp.and_then(|m| m.approval_wait),
                std::time::Duration::from_secs(120),
            )?,
            proxy: file
                .proxy
                .map(|p| {
                    Ok::<_, ConfigError>(ProxyConfig {
                        listen: p.listen.parse().map_err(|_| {
                            invalid("proxy.listen", format!("{:?} is not host:port", p.listen))
                        })?,
                        approval_wait: held_request_wait(p.approval_wait)?,
                    })
                })
                .transpose()?,
            rotate_keys_every: file
                .keys
                .and_then(|k| k.rotate_every)
                .map(|every| duration("keys.rotate_every", &every))
                .transpose()?,
            trusted_proxies: file
                .trusted_proxies
                .iter()
                .map(|ip| {
                    ip.parse().map_err(|_| {
                        invalid("trusted_proxies", format!("{ip:?} is not an IP address"))
                    })
                })
                .collect::<Result<_, _>>()?,
            oidc: oidc(file.oidc, &env)?,
        })
    }

    fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn proxy_keys_come_from_the_file_as_digests_and_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leash.toml");
        let file_key = "file-proxy-key-0123456789abcdef0123";
        let env_key = "env-proxy-key-0123456789abcdef01234";
        std::fs::write(
            &path,
            format!(
                "[authorize]\nproxy_keys = [\"{}\"]\n",
                leash_core::secret::SecretDigest::of(file_key)
                    .as_str()
                    .to_ascii_uppercase()
            ),
        )
        .unwrap();
        let flags = Flags {
            config: Some(path.clone()),
            ..Flags::default()
        };
        let c = Config::load(&flags, env(&[(ENV_AUTHORIZE_KEY, env_key)])).unwrap();
        assert!(c.authorize.accepts(file_key));
        assert!(c.authorize.accepts(env_key));
        assert!(!c.authorize.accepts("file-proxy-key"));
        // The file holds digests, never keys: a key itself is not a digest.
        let digest = leash_core::secret::SecretDigest::of(file_key);
        assert!(!c.authorize.accepts(digest.as_str()));
        let none = Config::load(&Flags::default(), env(&[])).unwrap();
        assert!(!none.authorize.accepts(""));
        for text in [
            "[authorize]\nproxy_keys = [\"not-a-digest\"]",
            "[authorize]\nproxy_keys = \"abc\"",
            "[authorize]\nkeys = []",
        ] {
            std::fs::write(&path, text).unwrap();
            assert!(Config::load(&flags, env(&[])).is_err(), "{text}");
        }
        let short = Config::load(&Flags::default(), env(&[(ENV_AUTHORIZE_KEY, "short")]));
        assert!(short.unwrap_err().to_string().contains(ENV_AUTHORIZE_KEY));
    }

    #[test]
    fn defaults() {
        let c = Config::load(&Flags::default(), env(&[])).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.database, "sqlite://./.leash/leash.db");
        assert_eq!(c.max_token_ttl, 300);
        assert_eq!(c.max_grant_ttl, 8 * 3600);
        assert!(c.issuer.is_none());
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leash.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\ndata_dir = \"/file\"\ndatabase = \"sqlite:///file.db\"\nissuer = \"http://file\"\n").unwrap();
        let flags = Flags {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:3".into()),
            ..Flags::default()
        };
        let c = Config::load(
            &flags,
            env(&[(ENV_LISTEN, "127.0.0.1:2"), (ENV_DATA_DIR, "/env")]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 3);
        assert_eq!(c.data_dir, PathBuf::from("/env"));
        assert_eq!(c.database, "sqlite:///file.db");
        assert_eq!(c.issuer.as_deref(), Some("http://file"));
        let flags = Flags {
            config: Some(path),
            ..Flags::default()
        };
        let c = Config::load(&flags, env(&[(ENV_ISSUER, "http://env/")])).unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.issuer.as_deref(), Some("http://env"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leash.toml");
        for text in [
            "listne = \"x\"",
            "max_token_ttl = -1",
            "[[upstream]]\nname = \"Mail\"\nurl = \"http://x\"",
            "issuer = \"ftp://x\"",
            "[approvals]\nwebhook_url = \"http://127.0.0.1:1/hook\"",
        ] {
            std::fs::write(&path, text).unwrap();
            let flags = Flags {
                config: Some(path.clone()),
                ..Flags::default()
            };
            assert!(Config::load(&flags, env(&[])).is_err(), "{text}");
        }
        let flags = Flags {
            config: Some(dir.path().join("missing.toml")),
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&flags, env(&[])),
            Err(ConfigError::Read { .. })
        ));
    }

    /// The config a file of `text` gives, with no environment.
    fn config_of(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leash.toml");
        std::fs::write(&path, text).unwrap();
        let flags = Flags {
            config: Some(path),
            ..Flags::default()
        };
        Config::load(&flags, env(&[]))
    }

    fn limits_of(text: &str) -> Result<Limits, ConfigError> {
        config_of(text).map(|c| c.limits)
    }

    #[test]
    fn limits_default_set_and_turned_off() {
        let defaults = limits_of("").unwrap();
        assert_eq!(defaults.max_headers, 64);
        assert_eq!(defaults.token_rate.unwrap().per_second.get(), 10);
        assert_eq!(defaults.gateway_rate.unwrap().burst.get(), 200);
        assert_eq!(defaults.upstream_timeout.as_secs(), 60);

        let set = limits_of(
            "[limits]\ngateway_rate = 5\ntoken_rate = 0\nheader_read_timeout = 3\nupstream_timeout = 7\n",
        )
        .unwrap();
        let gateway = set.gateway_rate.unwrap();
        assert_eq!((gateway.per_second.get(), gateway.burst.get()), (5, 10));
        assert!(set.token_rate.is_none());
        assert_eq!(set.header_read_timeout.as_secs(), 3);
        assert_eq!(set.upstream_timeout.as_secs(), 7);

        for bad in [
            "[limits]\ngateway_burst = 0",
            "[limits]\nmax_header_bytes = 100",
            "[limits]\nmax_headers = 5",
            "[limits]\nmax_connections = 0",
            "[limits]\nheader_read_timeout = 0",
            "[limits]\nupstream_timeout = 0",
            "[limits]\nrate = 1",
        ] {
            assert!(limits_of(bad).is_err(), "{bad}");
        }
    }

    fn upstreams_of(text: &str) -> Result<BTreeMap<String, Upstream>, ConfigError> {
        config_of(text).map(|c| c.upstreams)
    }

    #[test]
    fn mcp_upstreams_name_their_tools_actions() {
        let mcp =
            "[[upstream]]\nname = \"crm\"\nurl = \"http://127.0.0.1:9100/mcp\"\nkind = \"mcp\"\n";
        let upstreams = upstreams_of(&format!(
            "{mcp}[[upstream.tool]]\nname = \"lookup\"\n[[upstream.tool]]\nname = \"deleteContact\"\naction = \"crm:delete\"\nrisk = \"high\"\n"
        ))
        .unwrap();
        let crm = &upstreams["crm"];
        let server = crm.mcp.as_ref().unwrap();
        assert_eq!(server.tool("lookup").unwrap().action, "crm:lookup");
        assert_eq!(server.tool("deleteContact").unwrap().risk, Risk::High);
        assert!(server.tool("other").is_none());
        assert_eq!(
            crm.actions().into_iter().collect::<Vec<_>>(),
            [
                "crm:delete",
                "crm:lookup",
                "crm:prompts",
                "crm:resources",
                "crm:sampling"
            ]
        );
        for bad in [
            // A tool name that is no action name needs an explicit action.
            format!("{mcp}[[upstream.tool]]\nname = \"deleteContact\"\n"),
            format!("{mcp}[[upstream.tool]]\nname = \"a\"\n[[upstream.tool]]\nname = \"a\"\n"),
            format!("{mcp}[[upstream.route]]\nmethod = \"GET\"\npath = \"/\"\naction = \"crm:x\"\n"),
            format!("{mcp}unlisted_tools = \"sometimes\"\n"),
            // A listed tool cannot take the upstream's own actions.
            format!("{mcp}[[upstream.tool]]\nname = \"resources\"\n"),
            format!("{mcp}[[upstream.tool]]\nname = \"x\"\naction = \"crm:sampling\"\n"),
            format!("{mcp}[[upstream.tool]]\nname = \"a\"\nrisk = \"extreme\"\n"),
            mcp.replace("\"mcp\"", "\"grpc\""),
            "[[upstream]]\nname = \"mail\"\nurl = \"http://127.0.0.1:9\"\n[[upstream.tool]]\nname = \"a\"\n".to_owned(),
            "[mcp]\napproval_wait = 0\n".to_owned(),
        ] {
            assert!(upstreams_of(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unlisted_tools_take_their_own_action_and_never_another_s() {
        let mcp = "[[upstream]]\nname = \"crm\"\nurl = \"http://127.0.0.1:9100/mcp\"\nkind = \"mcp\"\n\
                   [[upstream.tool]]\nname = \"delete_contact\"\naction = \"crm:delete\"\nrisk = \"high\"\n";
        let refusing = upstreams_of(mcp).unwrap();
        let server = refusing["crm"].mcp.as_ref().unwrap();
        assert!(server.tool("lookup").is_none());
        assert!(!refusing["crm"].defines("crm:lookup"));
        assert!(refusing["crm"].defines("crm:delete"));

        for (setting, risk) in [("allow", Risk::Normal), ("high", Risk::High)] {
            let upstreams = upstreams_of(&format!(
                "{}unlisted_tools = \"{setting}\"\n{}",
                &mcp[..mcp.find("[[upstream.tool]]").unwrap()],
                &mcp[mcp.find("[[upstream.tool]]").unwrap()..]
            ))
            .unwrap();
            let crm = &upstreams["crm"];
            let server = crm.mcp.as_ref().unwrap();
            let lookup = server.tool("lookup").unwrap();
            assert_eq!((lookup.action.as_str(), lookup.risk), ("crm:lookup", risk));
            // A listed tool keeps its own action and risk.
            let listed = server.tool("delete_contact").unwrap();
            assert_eq!(
                (listed.action.as_str(), listed.risk),
                ("crm:delete", Risk::High)
            );
            // Names that would borrow an action the config gives to something else, or that
            // make no action at all, stay refused.
            for refused in [
                "delete",
                "resources",
                "prompts",
                "sampling",
                "getContact",
                "a.b",
                "",
                "x:y",
            ] {
                assert!(server.tool(refused).is_none(), "{refused}");
            }
            assert!(server.tool(&"a".repeat(65)).is_none());
            assert!(crm.defines("crm:lookup") && crm.defines("crm:delete"));
            assert!(!crm.defines("mail:lookup") && !crm.defines("crm:Lookup"));
            assert!(!crm.defines("crmx:lookup"));
            assert!(
                !crm.defines("crm:elicitation"),
                "no agent takes the elicitations' action"
            );
        }
    }

    #[test]
    fn upstream_actions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leash.toml");
        std::fs::write(
            &path,
            r#"
[[upstream]]
name = "mail"
url = "http://127.0.0.1:9001"
[[upstream.route]]
method = "GET"
path = "/messages/**"
action = "mail:read"
[[upstream.route]]
method = "POST"
path = "/messages/*/send"
action = "mail:send"
risk = "high"
"#,
        )
        .unwrap();
        let c = Config::load(
            &Flags {
                config: Some(path),
                ..Flags::default()
            },
            env(&[]),
        )
        .unwrap();
        let mail = &c.upstreams["mail"];
        assert_eq!(
            mail.actions().into_iter().collect::<Vec<_>>(),
            vec!["mail:read", "mail:send"]
        );
        assert_eq!(mail.routes[1].risk, Risk::High);
    }

    #[test]
    fn oauth_upstreams_take_discovery_or_endpoints_and_a_secret_from_the_environment() {
        let with = |oauth: &str, vars: &[(&str, &str)]| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("leash.toml");
            let text = format!(
                "[[upstream]]\nname = \"notes\"\nurl = \"http://127.0.0.1:9\"\n[upstream.oauth]\n{oauth}\n"
            );
            std::fs::write(&path, text).unwrap();
            let flags = Flags {
                config: Some(path),
                ..Flags::default()
            };
            Config::load(&flags, env(vars)).map(|mut c| c.upstreams.remove("notes").unwrap())
        };
        let discovered = with(
            "issuer = \"https://as.example\"\nclient_id = \"leash\"\nclient_secret_env = \"NOTES_SECRET\"\nscopes = [\"notes.read\"]",
            &[("NOTES_SECRET", "s3cret")],
        )
        .unwrap();
        let oauth = discovered.oauth.unwrap();
        assert_eq!(oauth.issuer.as_deref(), Some("https://as.example"));
        assert!(oauth.endpoints.is_none());
        assert_eq!(oauth.client_secret.unwrap().expose(), "s3cret");
        assert_eq!(oauth.client_auth, ClientAuth::Basic);
        assert_eq!(oauth.scopes, ["notes.read"]);

        let configured = with(
            "authorization_endpoint = \"https://as.example/authorize\"\ntoken_endpoint = \"https://as.example/token\"\nclient_id = \"leash\"\nclient_auth = \"client_secret_post\"",
            &[],
        )
        .unwrap();
        let oauth = configured.oauth.unwrap();
        assert!(oauth.client_secret.is_none(), "a public client");
        assert_eq!(oauth.client_auth, ClientAuth::Post);
        assert_eq!(
            oauth.endpoints.unwrap().token.as_str(),
            "https://as.example/token"
        );

        for (bad, vars) in [
            // Neither discovery nor both endpoints.
            ("client_id = \"leash\"", &[][..]),
            (
                "token_endpoint = \"https://as.example/token\"\nclient_id = \"leash\"",
                &[],
            ),
            // A secret named but not set.
            (
                "issuer = \"https://as.example\"\nclient_id = \"leash\"\nclient_secret_env = \"UNSET\"",
                &[],
            ),
            ("issuer = \"https://as.example\"\nclient_id = \"\"", &[]),
            ("issuer = \"ftp://as.example\"\nclient_id = \"leash\"", &[]),
            (
                "issuer = \"https://as.example\"\nclient_id = \"leash\"\nclient_auth = \"private_key_jwt\"",
                &[],
            ),
            (
                "issuer = \"https://as.example\"\nclient_id = \"leash\"\nscopes = [\"a b\"]",
                &[],
            ),
            (
                "issuer = \"https://as.example\"\nclient_id = \"leash\"\nclient_secret = \"inline\"",
                &[],
            ),
        ] {
            assert!(with(bad, vars).is_err(), "{bad}");
        }
        // Not both a delegation token and a connection.
        let both = config_of(
            "[[upstream]]\nname = \"notes\"\nurl = \"http://127.0.0.1:9\"\ninject = { kind = \"leash_token\", audience = \"https://notes.example\" }\n[upstream.oauth]\nissuer = \"https://as.example\"\nclient_id = \"leash\"\n",
        );
        assert!(both.is_err());
    }

    #[test]
    fn a_websocket_route_is_a_get_route() {
        let route = |method: &str| {
            format!(
                "[[upstream]]\nname = \"portal\"\nurl = \"https://portal.example\"\n\
                 [[upstream.route]]\nmethod = \"{method}\"\npath = \"/live\"\n\
                 action = \"portal:live\"\nwebsocket = true\n"
            )
        };
        let c = config_of(&route("get")).unwrap();
        assert!(c.upstreams["portal"].routes[0].websocket);
        for method in ["POST", "*"] {
            let error = config_of(&route(method)).unwrap_err().to_string();
            assert!(error.contains("websocket route must be GET"), "{error}");
        }
        let plain = config_of(&route("GET").replace("websocket = true\n", "")).unwrap();
        assert!(
            !plain.upstreams["portal"].routes[0].websocket,
            "off by default"
        );
    }

    #[test]
    fn the_proxy_and_its_hosts_are_checked() {
        let upstream = |name: &str, hosts: &str| {
            format!(
                "[[upstream]]\nname = \"{name}\"\nurl = \"https://{name}.example\"\nhosts = {hosts}\n"
            )
        };
        let c = config_of(&format!(
            "[proxy]\nlisten = \"127.0.0.1:8471\"\n{}{}",
            upstream(
                "finance",
                "[\"finance.example.com\", \"app.finance.example.com\"]"
            ),
            upstream("portal", "[\"portal.example.org\"]")
        ))
        .unwrap();
        let proxy = c.proxy.as_ref().unwrap();
        assert_eq!(proxy.listen.port(), 8471);
        assert_eq!(proxy.approval_wait.as_secs(), 120);
        assert_eq!(
            c.proxy_hosts(),
            [
                "app.finance.example.com",
                "finance.example.com",
                "portal.example.org"
            ]
        );
        assert_eq!(
            c.upstream_by_host("portal.example.org").unwrap().name,
            "portal"
        );
        assert!(c.upstream_by_host("example.org").is_none());
        assert!(config_of("").unwrap().proxy.is_none(), "off by default");
        for bad in [
            "[\"*.example.com\"]",
            "[\"Finance.example.com\"]",
            "[\"127.0.0.1\"]",
            "[\"[::1]\"]",
            "[\"a..b\"]",
            "[\"-a.example\"]",
            "[\"a.example:443\"]",
            "[\"0x7f000001\"]",
            "[\"0x7f.1\"]",
            "[\"a.123\"]",
            "[\"foo.0x1\"]",
            "[\"2130706433\"]",
            "[\"\"]",
        ] {
            assert!(
                config_of(&upstream("finance", bad)).is_err(),
                "{bad} was accepted"
            );
        }
        // One host, one upstream; a bad listen address; no zero wait, nor one over an hour.
        assert!(
            config_of(&format!(
                "{}{}",
                upstream("a", "[\"x.example\"]"),
                upstream("b", "[\"x.example\"]")
            ))
            .is_err()
        );
        assert!(config_of("[proxy]\nlisten = \"nowhere\"\n").is_err());
        assert!(config_of("[proxy]\nlisten = \"127.0.0.1:1\"\napproval_wait = 0\n").is_err());
        assert!(config_of("[proxy]\nlisten = \"127.0.0.1:1\"\napproval_wait = 3601\n").is_err());
        let hour = config_of("[proxy]\nlisten = \"127.0.0.1:1\"\napproval_wait = 3600\n");
        assert_eq!(hour.unwrap().proxy.unwrap().approval_wait.as_secs(), 3600);
        // An upstream's own CA, kept as a path (read and checked at start).
        let own = config_of(
            "[[upstream]]\nname = \"a\"\nurl = \"https://a.example\"\nca_file = \"ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            own.upstreams["a"].ca_file.as_deref(),
            Some(std::path::Path::new("ca.pem"))
        );
    }

    #[test]
    fn durations_are_days_hours_minutes_or_seconds() {
        assert_eq!(duration("k", "30d").unwrap().as_secs(), 30 * 86_400);
        assert_eq!(duration("k", "12h").unwrap().as_secs(), 12 * 3_600);
        assert_eq!(duration("k", "15m").unwrap().as_secs(), 900);
        assert_eq!(duration("k", "90s").unwrap().as_secs(), 90);
        for bad in ["", "d", "0d", "-1d", "1w", "1.5h", "99999999999999999999d"] {
            assert!(duration("k", bad).is_err(), "{bad}");
        }
        let c = config_of("[keys]\nrotate_every = \"30d\"\n").unwrap();
        assert_eq!(c.rotate_keys_every.unwrap().as_secs(), 30 * 86_400);
        assert!(
            config_of("").unwrap().rotate_keys_every.is_none(),
            "off by default"
        );
    }
}
