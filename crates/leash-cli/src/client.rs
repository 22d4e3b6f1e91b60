//! The client verbs: thin HTTP calls to a Leash server, with one-line errors.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::Subcommand;
use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_server::files::IfExists;
use serde_json::{Value, json};

use crate::Remote;

use leash_core::assertion::JWT_BEARER;
use leash_core::token::{GRANT_TOKEN_TYPE, TOKEN_EXCHANGE};

/// `leash user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a human user and print their API key (shown once).
    Add {
        /// The user's unique name.
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List users.
    List {
        #[command(flatten)]
        remote: Remote,
    },
}

/// `leash keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Rotate the token-signing key (admin key): the new key is published at once and signs
    /// from `jwks_max_age` later; the old one stays published until its last token expires.
    Rotate {
        /// The current key is compromised: switch at once and withdraw the old key at once
        /// (every token it signed dies).
        #[arg(long)]
        compromised: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// List every signing key there has been, withdrawn ones included.
    List {
        #[command(flatten)]
        remote: Remote,
    },
}

/// `leash proxy …`.
#[derive(Debug, Subcommand)]
pub enum ProxyCommand {
    /// Print the proxy CA's certificate (PEM): the agent's browser must trust it to browse
    /// through the proxy (API §16). Public; no key needed.
    Ca {
        #[command(flatten)]
        remote: Remote,
    },
}

/// Runs a `leash proxy` verb.
pub async fn proxy(cmd: ProxyCommand) -> anyhow::Result<()> {
    let ProxyCommand::Ca { remote } = cmd;
    let url = format!("{}/v1/proxy/ca", base(&remote));
    let response = http()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    match json_or_error(response).await? {
        Value::String(pem) if pem.starts_with("-----BEGIN CERTIFICATE-----") => {
            print!("{pem}");
            Ok(())
        }
        other => bail!("{url} did not answer a certificate: {other}"),
    }
}

/// Runs a `leash keys` verb.
pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    let value = match cmd {
        KeysCommand::Rotate {
            compromised,
            remote,
        } => {
            call(
                &remote,
                reqwest::Method::POST,
                "/v1/keys/rotate",
                Some(json!({ "compromised": compromised })),
            )
            .await?
        }
        KeysCommand::List { remote } => {
            call(&remote, reqwest::Method::GET, "/v1/keys", None).await?
        }
    };
    print(&value);
    Ok(())
}

/// `leash agent …`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Generate an agent key pair and write the private JWK to a file (mode 0600).
    Keygen {
        /// Where to write the private JWK.
        #[arg(long, short)]
        out: PathBuf,
        /// Signature algorithm: EdDSA, Ed25519 or ES256.
        #[arg(long, default_value = "EdDSA")]
        alg: String,
    },
    /// Register an agent with the public part of its key (admin key).
    Register {
        /// The agent's URI, e.g. spiffe://example.org/agent/mailbot.
        #[arg(long)]
        id: String,
        /// The agent's private JWK file (only the public part is sent).
        #[arg(long)]
        key: PathBuf,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List agents (admin key).
    List {
        #[command(flatten)]
        remote: Remote,
    },
    /// Disable an agent: no new tokens, every grant revoked (admin key).
    Disable {
        /// The agent's URI.
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Exchange a grant handle for a DPoP-bound access token; saves token and proof key.
    Token {
        /// The agent's URI.
        #[arg(long)]
        id: String,
        /// The agent's private JWK file.
        #[arg(long)]
        key: PathBuf,
        /// The grant handle (lgh_…); also LEASH_GRANT_HANDLE.
        #[arg(long, env = "LEASH_GRANT_HANDLE", hide_env_values = true)]
        handle: String,
        /// Space-separated subset of the grant's actions.
        #[arg(long)]
        scope: Option<String>,
        /// Where to save the session (token + DPoP key), mode 0600.
        #[arg(long, default_value = "leash-session.json")]
        out: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// Send one request with the saved token and a fresh DPoP proof; prints the body.
    Curl {
        /// HTTP method.
        method: String,
        /// Full URL, e.g. http://127.0.0.1:8470/gw/mail/messages.
        url: String,
        /// Request body.
        #[arg(long, short)]
        data: Option<String>,
        /// Extra header `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// The session file written by `leash agent token`.
        #[arg(long, default_value = "leash-session.json")]
        session: PathBuf,
        /// On `approval_required`, wait up to this many seconds for the human to decide, then
        /// send the request again with the approval (0: do not wait).
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        wait_approval: u64,
    },
}

/// `leash approvals …`.
#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// List approvals of your grants (admin key: all), newest first.
    List {
        /// Only those in this status: pending, approved, denied, expired or used.
        #[arg(long)]
        status: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show exactly what an approval would let through.
    Show {
        /// The approval id (apr_…).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Approve one exact request; the agent may then send it once. An MCP server's
    /// elicitation (method elicitation/create) is answered with --content.
    Approve {
        /// The approval id (apr_…).
        id: String,
        /// For an elicitation: your answer to its form, a JSON object, e.g. '{"email": "a@b.c"}'
        /// (`leash approvals show` prints the form).
        #[arg(long, value_name = "JSON")]
        content: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Deny a request.
    Deny {
        /// The approval id (apr_…).
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// One line saying what an approval is for: `POST mail /messages/7/send?x=1`.
fn approval_request_line(a: &Value) -> String {
    let text = |k: &str| inert(a[k].as_str().unwrap_or("?"));
    let query = a["query"]
        .as_str()
        .map(|q| format!("?{}", inert(q)))
        .unwrap_or_default();
    format!(
        "{} {} {}{query}",
        text("method"),
        text("upstream"),
        text("path")
    )
}

fn approval_details(a: &Value) -> String {
    let text = |k: &str| inert(a[k].as_str().unwrap_or("-"));
    format!(
        "{id}  {status}\n  request   {line}\n  action    {action}\n  body      {size} bytes, sha256 {digest}\n  \
         grant     {grant} ({purpose})\n  agent     {agent}\n  asked     {asked}, expires {expires}\n  \
         decided   {decided} by {approver}",
        id = text("id"),
        status = text("status"),
        line = approval_request_line(a),
        action = text("action"),
        size = a["body_size"].as_i64().unwrap_or(0),
        digest = text("body_sha256"),
        grant = text("grant_id"),
        purpose = text("purpose"),
        agent = text("agent"),
        asked = text("requested_at"),
        expires = text("expires_at"),
        decided = text("decided_at"),
        approver = text("approver"),
    ) + &headers_details(a)
        + &elicitation_details(a)
}

/// The request headers an approval binds, one per line (as the agent sent them: inert).
fn headers_details(a: &Value) -> String {
    let headers = a["headers"].as_array().cloned().unwrap_or_default();
    headers
        .iter()
        .map(|h| {
            format!(
                "\n  header    {}: {}",
                inert(h["name"].as_str().unwrap_or("?")),
                inert(h["value"].as_str().unwrap_or(""))
            )
        })
        .collect()
}

/// An elicitation's message and form, as text. The server wrote them: every control
/// character (C0 and C1: terminal escapes, new lines that fake a line of ours) and every
/// invisible format character (bidi overrides that reorder what the human reads) is shown
/// escaped, never printed.
fn elicitation_details(a: &Value) -> String {
    let Some(elicitation) = a.get("elicitation") else {
        return String::new();
    };
    format!(
        "\n  the server asks the human: {}\n  form      {}\n  answer    leash approvals approve {} --content '{{…}}'  (or deny)",
        inert(elicitation["message"].as_str().unwrap_or("")),
        inert(&elicitation["requested_schema"].to_string()),
        inert(a["id"].as_str().unwrap_or("?")),
    )
}

/// `text` with control and format characters escaped as `\u{…}`.
fn inert(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || is_format(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Unicode's invisible format characters that change how text reads (general category Cf:
/// bidi marks, overrides and isolates, zero-width characters, soft hyphen...).
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
}

/// Runs a `leash approvals` verb.
pub async fn approvals(cmd: ApprovalsCommand) -> anyhow::Result<()> {
    let get = reqwest::Method::GET;
    match cmd {
        ApprovalsCommand::List {
            status,
            json,
            remote,
        } => {
            let path = match status {
                Some(s) => format!("/v1/approvals?status={}", encode_path(&s)),
                None => "/v1/approvals".into(),
            };
            let value = call(&remote, get, &path, None).await?;
            if json {
                print(&value);
                return Ok(());
            }
            let rows = value["approvals"].as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                eprintln!("no approvals");
            }
            for a in rows {
                println!(
                    "{:<28} {:<9} {:<16} {}",
                    inert(a["id"].as_str().unwrap_or("?")),
                    inert(a["status"].as_str().unwrap_or("?")),
                    inert(a["action"].as_str().unwrap_or("?")),
                    approval_request_line(&a)
                );
            }
        }
        ApprovalsCommand::Show { id, json, remote } => {
            let path = format!("/v1/approvals/{}", encode_path(&id));
            let value = call(&remote, get, &path, None).await?;
            if json {
                print(&value);
            } else {
                println!("{}", approval_details(&value));
            }
        }
        ApprovalsCommand::Approve {
            id,
            content,
            remote,
        } => {
            let body = match content {
                Some(text) => {
                    let content: Value = serde_json::from_str(&text)
                        .map_err(|e| anyhow::anyhow!("--content is not JSON: {e}"))?;
                    anyhow::ensure!(content.is_object(), "--content must be a JSON object");
                    Some(serde_json::json!({ "content": content }))
                }
                None => None,
            };
            decide_approval(&remote, &id, "approve", body).await?
        }
        ApprovalsCommand::Deny { id, remote } => {
            decide_approval(&remote, &id, "deny", None).await?
        }
    }
    Ok(())
}

async fn decide_approval(
    remote: &Remote,
    id: &str,
    verb: &str,
    body: Option<Value>,
) -> anyhow::Result<()> {
    let path = format!("/v1/approvals/{}/{verb}", encode_path(id));
    let value = call(remote, reqwest::Method::POST, &path, body).await?;
    println!("{}", approval_details(&value));
    Ok(())
}

/// `leash grant …`.
#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Delegate one task to one agent; prints the grant and its handle (shown once).
    Create {
        /// The agent's URI.
        #[arg(long)]
        agent: String,
        /// What the task is for.
        #[arg(long)]
        purpose: String,
        /// Upstream the agent may reach (repeatable).
        #[arg(long = "upstream", required = true)]
        upstreams: Vec<String>,
        /// Action the agent may take, e.g. mail:read (repeatable).
        #[arg(long = "action", required = true)]
        actions: Vec<String>,
        /// Action that needs your approval each time (repeatable).
        #[arg(long = "approval-required")]
        approval_required: Vec<String>,
        /// Time limit in seconds.
        #[arg(long, default_value_t = 1800)]
        ttl: i64,
        /// Request budget at the gateway.
        #[arg(long)]
        max_requests: Option<i64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List grants (yours; all with the admin key).
    List {
        /// Only grants with this status: active, completed, revoked, expired.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show one grant.
    Show {
        /// Grant id (grt_…).
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke a grant: every token of it dies at once.
    Revoke {
        /// Grant id (grt_…).
        id: String,
        /// Why, for the record.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Mark a grant's task as done: every token of it dies at once.
    Complete {
        /// Grant id (grt_…).
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(crate) fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent("leash-cli")
        .build()
        .context("cannot build HTTP client")
}

pub(crate) fn base(remote: &Remote) -> String {
    remote.server.trim_end_matches('/').to_owned()
}

pub(crate) fn bearer(remote: &Remote) -> anyhow::Result<String> {
    remote
        .token
        .clone()
        .ok_or_else(|| anyhow!("no API key: pass --token or set LEASH_TOKEN"))
}

/// Turns a response into its JSON body, or an error naming the server's error code.
pub(crate) async fn json_or_error(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response.text().await.context("cannot read the response")?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        return Ok(body);
    }
    let code = body.get("error").and_then(Value::as_str).unwrap_or("error");
    let description = body
        .get("error_description")
        .and_then(Value::as_str)
        .unwrap_or("");
    bail!("server answered {status}: {code}: {description}")
}

pub(crate) async fn call(
    remote: &Remote,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let url = format!("{}{path}", base(remote));
    let mut request = http()?.request(method, &url).bearer_auth(bearer(remote)?);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    json_or_error(response).await
}

pub(crate) fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Writes `value` as pretty JSON to a file only its owner may read.
fn write_private(path: &Path, value: &Value, if_exists: IfExists) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    leash_server::files::write_private(path, text.as_bytes(), if_exists)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn read_key(path: &Path) -> anyhow::Result<AgentKey> {
    AgentKey::from_private_jwk(&read_json(path)?).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn encode_path(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

/// Runs a `leash user` verb.
pub async fn user(cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add { name, remote } => {
            let user = call(
                &remote,
                reqwest::Method::POST,
                "/v1/users",
                Some(json!({"name": name})),
            )
            .await?;
            print(&user);
            eprintln!("the api_key is shown once: give it to {name} (LEASH_TOKEN)");
        }
        UserCommand::List { remote } => {
            print(&call(&remote, reqwest::Method::GET, "/v1/users", None).await?)
        }
    }
    Ok(())
}

/// Runs a `leash grant` verb.
pub async fn grant(cmd: GrantCommand) -> anyhow::Result<()> {
    let value = match cmd {
        GrantCommand::Create {
            agent,
            purpose,
            upstreams,
            actions,
            approval_required,
            ttl,
            max_requests,
            remote,
        } => {
            let body = json!({
                "agent": agent, "purpose": purpose, "upstreams": upstreams, "actions": actions,
                "approval_required": approval_required, "ttl_seconds": ttl, "max_requests": max_requests,
            });
            let grant = call(&remote, reqwest::Method::POST, "/v1/grants", Some(body)).await?;
            eprintln!(
                "the handle is shown once: hand it to the agent (leash agent token --handle …)"
            );
            grant
        }
        GrantCommand::List { status, remote } => {
            let path = match status {
                Some(s) => format!("/v1/grants?status={}", encode_path(&s)),
                None => "/v1/grants".into(),
            };
            call(&remote, reqwest::Method::GET, &path, None).await?
        }
        GrantCommand::Show { id, remote } => {
            call(
                &remote,
                reqwest::Method::GET,
                &format!("/v1/grants/{}", encode_path(&id)),
                None,
            )
            .await?
        }
        GrantCommand::Revoke { id, reason, remote } => {
            let body = reason.map(|r| json!({"reason": r}));
            call(
                &remote,
                reqwest::Method::POST,
                &format!("/v1/grants/{}/revoke", encode_path(&id)),
                body,
            )
            .await?
        }
        GrantCommand::Complete { id, remote } => {
            call(
                &remote,
                reqwest::Method::POST,
                &format!("/v1/grants/{}/complete", encode_path(&id)),
                None,
            )
            .await?
        }
    };
    print(&value);
    Ok(())
}

/// Runs a `leash agent` verb.
pub async fn agent(cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Keygen { out, alg } => {
            let alg = Alg::parse(&alg).map_err(|e| anyhow!("{e}"))?;
            if out.exists() {
                bail!("{} exists; refusing to overwrite a key", out.display());
            }
            let key = AgentKey::generate(alg);
            write_private(&out, &key.to_private_jwk(), IfExists::Fail)?;
            println!(
                "wrote {} (private, mode 0600); public key thumbprint {}",
                out.display(),
                key.public().thumbprint()
            );
        }
        AgentCommand::Register {
            id,
            key,
            name,
            remote,
        } => {
            let key = read_key(&key)?;
            let mut public = key.public().to_value();
            public["alg"] = json!(key.alg().name());
            let body = json!({"id": id, "name": name.unwrap_or_else(|| id.clone()), "jwks": {"keys": [public]}});
            print(&call(&remote, reqwest::Method::POST, "/v1/agents", Some(body)).await?);
        }
        AgentCommand::List { remote } => {
            print(&call(&remote, reqwest::Method::GET, "/v1/agents", None).await?)
        }
        AgentCommand::Disable { id, remote } => {
            let path = format!("/v1/agents/{}/disable", encode_path(&id));
            print(&call(&remote, reqwest::Method::POST, &path, None).await?);
        }
        AgentCommand::Token {
            id,
            key,
            handle,
            scope,
            out,
            remote,
        } => {
            let session =
                exchange(&remote, &id, &read_key(&key)?, &handle, scope.as_deref()).await?;
            write_private(&out, &session, IfExists::Replace)?;
            println!(
                "token saved to {} (scope: {}, expires in {} s)",
                out.display(),
                session["scope"].as_str().unwrap_or(""),
                session["expires_in"]
            );
        }
        AgentCommand::Curl {
            method,
            url,
            data,
            headers,
            session,
            wait_approval,
        } => {
            curl(&method, &url, data, &headers, &session, wait_approval).await?;
        }
    }
    Ok(())
}

/// Does the token exchange with a fresh DPoP key; returns the session to save.
pub async fn exchange(
    remote: &Remote,
    agent: &str,
    key: &AgentKey,
    handle: &str,
    scope: Option<&str>,
) -> anyhow::Result<Value> {
    let token_url = format!("{}/oauth2/token", base(remote));
    let dpop_key = AgentKey::generate(Alg::EdDsa);
    let client = http()?;
    let mut nonce: Option<String> = None;
    for _ in 0..2 {
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE.to_owned()),
            ("subject_token", handle.to_owned()),
            ("subject_token_type", GRANT_TOKEN_TYPE.to_owned()),
            ("client_assertion_type", JWT_BEARER.to_owned()),
            (
                "client_assertion",
                key.client_assertion(agent, &token_url, now()),
            ),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope.to_owned()));
        }
        let proof = dpop_key.dpop_proof("POST", &token_url, None, nonce.as_deref(), now());
        let response = client
            .post(&token_url)
            .header("DPoP", proof)
            .form(&form)
            .send()
            .await
            .with_context(|| format!("cannot reach {token_url}"))?;
        let fresh_nonce = response
            .headers()
            .get("dpop-nonce")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match json_or_error(response).await {
            Ok(body) => {
                return Ok(json!({
                    "access_token": body["access_token"],
                    "scope": body["scope"],
                    "expires_in": body["expires_in"],
                    "expires_at": now() + body["expires_in"].as_i64().unwrap_or(0),
                    "agent": agent,
                    "dpop_key": dpop_key.to_private_jwk(),
                    "dpop_nonce": fresh_nonce,
                }));
            }
            Err(e)
                if e.to_string().contains("use_dpop_nonce")
                    && fresh_nonce.is_some()
                    && nonce.is_none() =>
            {
                nonce = fresh_nonce;
            }
            Err(e) => return Err(e),
        }
    }
    bail!("the server kept asking for a DPoP nonce")
}

/// An agent's DPoP-bound token and the key its proofs are signed with (what `leash agent
/// token` saves and `leash agent curl` sends with).
pub(crate) struct AgentSession {
    token: String,
    key: AgentKey,
    nonce: Option<String>,
    client: reqwest::Client,
}

/// One answer to an agent's request.
pub(crate) struct Reply {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl AgentSession {
    fn load(session: &Path) -> anyhow::Result<Self> {
        Self::from_session(&read_json(session)?)
            .with_context(|| format!("{}: run `leash agent token`", session.display()))
    }

    /// The session as [`exchange`] returns it.
    pub(crate) fn from_session(value: &Value) -> anyhow::Result<Self> {
        let token = value["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("the session has no access_token"))?;
        let key = AgentKey::from_private_jwk(&value["dpop_key"])
            .map_err(|e| anyhow!("the session's DPoP key: {e}"))?;
        Ok(Self {
            token: token.to_owned(),
            key,
            nonce: value["dpop_nonce"].as_str().map(str::to_owned),
            client: http()?,
        })
    }

    /// One request with a fresh proof (retried once if the server asks for a DPoP nonce).
    pub(crate) async fn send(
        &mut self,
        method: &reqwest::Method,
        url: &str,
        headers: &[(String, String)],
        data: Option<&str>,
    ) -> anyhow::Result<Reply> {
        for attempt in 0..2 {
            let proof = self.key.dpop_proof(
                method.as_str(),
                url,
                Some(&self.token),
                self.nonce.as_deref(),
                now(),
            );
            let mut request = self
                .client
                .request(method.clone(), url)
                .header("Authorization", format!("DPoP {}", self.token))
                .header("DPoP", proof);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            if let Some(data) = data {
                request = request.body(data.to_owned());
            }
            let response = request
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?;
            let status = response.status();
            let fresh_nonce = response
                .headers()
                .get("dpop-nonce")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let asks_nonce = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("use_dpop_nonce"));
            if status == reqwest::StatusCode::UNAUTHORIZED
                && asks_nonce
                && attempt == 0
                && fresh_nonce.is_some()
            {
                self.nonce = fresh_nonce;
                continue;
            }
            let headers = response.headers().clone();
            let body = response.text().await.context("cannot read the response")?;
            return Ok(Reply {
                status,
                headers,
                body,
            });
        }
        bail!("the server kept asking for a DPoP nonce")
    }
}

/// How often a waiting `leash agent curl` asks whether its approval was decided.
const APPROVAL_POLL: std::time::Duration = std::time::Duration::from_millis(500);

async fn curl(
    method: &str,
    url: &str,
    data: Option<String>,
    headers: &[String],
    session: &Path,
    wait_approval: u64,
) -> anyhow::Result<()> {
    let mut agent = AgentSession::load(session)?;
    let method = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .context("not an HTTP method")?;
    let mut extra = Vec::new();
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| anyhow!("header {header:?} must be `Name: value`"))?;
        extra.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut reply = agent.send(&method, url, &extra, data.as_deref()).await?;
    if reply.status == reqwest::StatusCode::FORBIDDEN && wait_approval > 0 {
        let refusal: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        if let (Some("approval_required"), Some(id)) =
            (refusal["error"].as_str(), refusal["approval_id"].as_str())
        {
            let origin = url::Url::parse(url)
                .context("not a URL")?
                .origin()
                .ascii_serialization();
            wait_for_approval(&mut agent, &origin, id, wait_approval).await?;
            extra.push(("Leash-Approval".into(), id.to_owned()));
            reply = agent.send(&method, url, &extra, data.as_deref()).await?;
        }
    }
    eprintln!("{}", reply.status);
    println!("{}", reply.body);
    if !reply.status.is_success() {
        bail!("request refused with {}", reply.status);
    }
    Ok(())
}

/// Polls the approval with the agent's own token until the human decides, showing a spinner.
async fn wait_for_approval(
    agent: &mut AgentSession,
    origin: &str,
    id: &str,
    seconds: u64,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    eprintln!("approval {id} is needed; the human can run: leash approvals approve {id}");
    let status_url = format!("{origin}/v1/approvals/{id}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let frames = ['|', '/', '-', '\\'];
    for frame in frames.iter().cycle() {
        let reply = agent
            .send(&reqwest::Method::GET, &status_url, &[], None)
            .await?;
        if !reply.status.is_success() {
            eprintln!();
            bail!("cannot read approval {id}: {} {}", reply.status, reply.body);
        }
        let approval: Value = serde_json::from_str(&reply.body).context("approval is not JSON")?;
        match approval["status"].as_str() {
            Some("approved") => {
                eprintln!(
                    "\rapproved by {}; sending   ",
                    approval["approver"].as_str().unwrap_or("?")
                );
                return Ok(());
            }
            Some("pending") => {}
            other => {
                eprintln!();
                bail!("approval {id} is {}", other.unwrap_or("unknown"));
            }
        }
        if std::time::Instant::now() >= deadline {
            eprintln!();
            bail!("approval {id} is still pending after {seconds} s");
        }
        eprint!("\r{frame} waiting for approval {id} ");
        let _ = std::io::stderr().flush();
        tokio::time::sleep(APPROVAL_POLL).await;
    }
    bail!("unreachable: the spinner cycles forever")
}

#[cfg(test)]
mod tests {
    use super::inert;

    #[test]
    fn what_a_server_or_agent_wrote_is_printed_inert() {
        assert_eq!(inert("New email?"), "New email?");
        assert_eq!(inert("é ü 日本"), "é ü 日本");
        for (raw, shown) in [
            ("\u{1b}[2J", "\\u{1b}[2J"),
            ("\u{9b}2J", "\\u{9b}2J"),
            ("a\nb", "a\\u{a}b"),
            ("\u{202e}exe", "\\u{202e}exe"),
            ("x\u{2066}y\u{2069}", "x\\u{2066}y\\u{2069}"),
            ("zero\u{200b}width", "zero\\u{200b}width"),
        ] {
            assert_eq!(inert(raw), shown, "{raw:?}");
        }
    }
}
