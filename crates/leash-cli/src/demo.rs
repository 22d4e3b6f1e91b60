//! `leash demo`: the whole story in one process — a Leash server on a temporary embedded store,
//! a small mailbox app behind it, and a human and an agent walking through delegation. Every
//! outcome is checked, so the demo doubles as a smoke test of a build: any surprise ends it
//! with a non-zero exit.

use std::fmt::Display;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anstyle::{AnsiColor, Style};
use anyhow::{Context as _, anyhow, bail};
use leash_core::audit::AuditEvent;
use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use reqwest::Method;
use serde_json::{Value, json};

use crate::Remote;
use crate::client::{AgentSession, Reply, call, exchange};
use crate::demo_idp::DemoIdp;

/// `leash demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Pause at the approval so that you approve (or deny) it yourself with `leash approvals`
    /// in another terminal.
    #[arg(long)]
    interactive: bool,
    /// Do the approval yourself in the web console: Alice signs in at the demo's own identity
    /// provider (one click) and approves or denies the send in her approvals inbox.
    #[arg(long, conflicts_with = "interactive")]
    console: bool,
    /// With --interactive or --console: how long to wait for your decision.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    wait: u64,
}

const AGENT: &str = "spiffe://demo.leash.dev/agent/inbox-triage";
const PURPOSE: &str = "triage my inbox";
/// How often the interactive demo asks whether the approval was decided.
const APPROVAL_POLL: Duration = Duration::from_millis(500);

/// Runs the demo; an error means some step did not behave as Leash promises.
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let session_cookie = format!("session={}", random_hex());
    let mailbox = Mailbox::start(&session_cookie).await?;
    let crm = Crm::start().await?;
    let idp = if args.console {
        Some(DemoIdp::start().await?)
    } else {
        None
    };
    let server = Server::start(dir.path(), &mailbox.url, &crm.url, idp.as_ref()).await?;
    if let Some(idp) = &idp {
        idp.set_redirect_uri(format!("{}/auth/callback", server.url));
    }
    heading(format!(
        "Leash demo: Alice delegates one task to an AI agent\n   Leash on {} (temporary store in {}), a sample mailbox app on {}",
        server.url,
        dir.path().display(),
        mailbox.url
    ));
    let story = Story {
        leash: server.url.clone(),
        admin: server.admin_key.clone(),
        mailbox: &mailbox,
        crm: &crm,
        session_cookie,
        dir: dir.path(),
        idp: idp.as_ref(),
        args,
    };
    let told = story.tell().await;
    server.stop().await;
    told?;
    heading("Every step behaved as expected. Nothing was kept: the store was temporary.");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Output

#[derive(Clone, Copy)]
enum Mark {
    Allow,
    Deny,
    Wait,
    Done,
    Flag,
}

fn say(mark: Mark, text: impl Display) {
    let (label, color) = match mark {
        Mark::Allow => ("ALLOW", AnsiColor::Green),
        Mark::Deny => ("DENY ", AnsiColor::Red),
        Mark::Wait => ("WAIT ", AnsiColor::Yellow),
        Mark::Done => (" OK  ", AnsiColor::Cyan),
        Mark::Flag => ("FLAG ", AnsiColor::Magenta),
    };
    let style = Style::new().bold().fg_color(Some(color.into()));
    anstream::println!("   {style}[{label}]{style:#} {text}");
}

fn note(text: impl Display) {
    let style = Style::new().dimmed();
    anstream::println!("           {style}{text}{style:#}");
}

fn heading(text: impl Display) {
    let style = Style::new().bold();
    anstream::println!("\n{style}{text}{style:#}");
}

fn step(number: u8, text: impl Display) {
    heading(format!("{number}. {text}"));
}

fn random_hex() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// The Leash server, in this process

struct Server {
    url: String,
    admin_key: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(
        dir: &std::path::Path,
        mailbox: &str,
        crm: &str,
        idp: Option<&DemoIdp>,
    ) -> anyhow::Result<Self> {
        let config_path = dir.join("leash.toml");
        let mut config = config_toml(dir, mailbox, crm);
        if let Some(idp) = idp {
            config.push_str(&oidc_toml(idp));
        }
        std::fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let flags = leash_server::config::Flags {
            config: Some(config_path),
            ..Default::default()
        };
        // The demo's settings are its own: nothing from the environment (LEASH_*) applies; the
        // demo IdP's client secret reaches the config as the environment would bring it.
        let secret = idp.map(|idp| idp.client_secret.clone());
        let config = leash_server::config::Config::load(&flags, |name| {
            (name == DEMO_SECRET_ENV).then(|| secret.clone()).flatten()
        })?;
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(leash_server::run(
            config,
            leash_server::Secrets::default(),
            Arc::new(leash_core::SystemClock),
            move |started| {
                let key = started
                    .generated_admin_key
                    .as_ref()
                    .map(|k| k.expose().to_owned());
                let _ = started_tx.send((format!("http://{}", started.addr), key));
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let (url, admin_key) = match started_rx.await {
            Ok(started) => started,
            Err(_) => {
                let why = match task.await {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => anyhow!("it stopped at once"),
                    Err(e) => anyhow!("it panicked: {e}"),
                };
                return Err(why.context("the demo's Leash server did not start"));
            }
        };
        let admin_key =
            admin_key.ok_or_else(|| anyhow!("a fresh store must generate an admin key"))?;
        Ok(Self {
            url,
            admin_key,
            stop,
            task,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("leash demo: the server stopped with an error: {e:#}"),
            Err(e) => eprintln!("leash demo: the server task failed: {e}"),
        }
    }
}

/// The routes of `examples/leash.toml`, and a finance app the task is not about.
fn config_toml(dir: &std::path::Path, mailbox: &str, crm: &str) -> String {
    let data_dir = toml_string(&dir.join("data").display().to_string());
    let mailbox = toml_string(mailbox);
    let crm = toml_string(crm);
    format!(
        r#"listen = "127.0.0.1:0"
data_dir = {data_dir}

[[upstream]]
name = "mail"
url = {mailbox}
route = [
  {{ method = "GET", path = "/messages/**", action = "mail:read" }},
  {{ method = "POST", path = "/drafts", action = "mail:draft" }},
  {{ method = "POST", path = "/messages/*/send", action = "mail:send", risk = "high" }},
  {{ method = "DELETE", path = "/messages/*", action = "mail:delete" }},
  {{ method = "GET", path = "/export", action = "mail:export" }},
]

[[upstream]]
name = "finance"
url = {mailbox}
route = [
  {{ method = "GET", path = "/**", action = "finance:read" }},
]

[[upstream]]
name = "crm"
url = {crm}
kind = "mcp"
tool = [
  {{ name = "lookup_contact", action = "crm:lookup" }},
  {{ name = "delete_contact", action = "crm:delete", risk = "high" }},
]
"#
    )
}

/// The environment variable name the demo's `[oidc]` reads its client secret from.
const DEMO_SECRET_ENV: &str = "LEASH_DEMO_OIDC_SECRET";

/// `[oidc]` for the demo's identity provider (`leash demo --console`).
fn oidc_toml(idp: &DemoIdp) -> String {
    format!(
        "\n[oidc]\nissuer = {}\nclient_id = {}\nclient_secret_env = {}\naudience = {}\n",
        toml_string(&idp.issuer),
        toml_string(crate::demo_idp::CLIENT_ID),
        toml_string(DEMO_SECRET_ENV),
        toml_string(crate::demo_idp::AUDIENCE),
    )
}

fn toml_string(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

// ---------------------------------------------------------------------------------------------
// The sample upstream: a mailbox that only answers Alice's session cookie

/// What the mailbox received, to show what Leash forwarded.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
struct MailboxState {
    cookie: Arc<str>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct Mailbox {
    url: String,
    state: MailboxState,
}

impl Mailbox {
    async fn start(cookie: &str) -> anyhow::Result<Self> {
        let state = MailboxState {
            cookie: cookie.into(),
            seen: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot start the sample mailbox")?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new()
            .fallback(mailbox)
            .with_state(state.clone());
        // Ends with the process; the demo is a single run.
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, state })
    }

    fn seen(&self) -> Vec<Seen> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count(&self, method: &str, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path == path)
            .count()
    }
}

async fn mailbox(
    axum::extract::State(state): axum::extract::State<MailboxState>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse as _;
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let headers = request
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let seen = Seen {
        method,
        path,
        headers,
    };
    let signed_in = seen.header("cookie") == Some(&*state.cookie);
    let answer = if !signed_in {
        (StatusCode::UNAUTHORIZED, json!({"error": "not signed in"}))
    } else {
        match (seen.method.as_str(), seen.path.as_str()) {
            ("GET", "/messages") => (
                StatusCode::OK,
                json!({"messages": [
                    {"id": "1", "from": "bank@example.com", "subject": "Your statement is ready"},
                    {"id": "2", "from": "bob@example.com", "subject": "Lunch on Friday?"},
                    {"id": "3", "from": "news@example.com", "subject": "This week in Rust"},
                ]}),
            ),
            ("GET", "/messages/2") => (
                StatusCode::OK,
                json!({"id": "2", "from": "bob@example.com", "body": "Noon at the usual place?"}),
            ),
            ("POST", "/drafts") => (StatusCode::CREATED, json!({"id": "draft-1"})),
            ("POST", "/messages/draft-1/send") => (StatusCode::OK, json!({"sent": "draft-1"})),
            ("GET", "/export") => (StatusCode::OK, json!({"messages": 3})),
            ("GET", "/accounts") => (StatusCode::OK, json!({"balance": "12,345.67"})),
            _ => (StatusCode::NOT_FOUND, json!({"error": "no such thing"})),
        }
    };
    state
        .seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(seen);
    // A real web app refreshes its session cookie; Leash must keep it from the agent.
    let refresh = format!("{}; HttpOnly; Path=/", state.cookie);
    (
        answer.0,
        [(axum::http::header::SET_COOKIE, refresh)],
        axum::Json(answer.1),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// The sample MCP server: a CRM with two tools (JSON answers, as the Streamable HTTP transport
// allows; enough for the demo, which speaks to it through Leash only)

struct Crm {
    url: String,
    deleted: Arc<Mutex<usize>>,
}

impl Crm {
    async fn start() -> anyhow::Result<Self> {
        let deleted: Arc<Mutex<usize>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot start the sample CRM")?;
        let url = format!("http://{}/mcp", listener.local_addr()?);
        let app = axum::Router::new()
            .route("/mcp", axum::routing::post(crm))
            .with_state(deleted.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, deleted })
    }

    fn deleted(&self) -> usize {
        *self.deleted.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn crm(
    axum::extract::State(deleted): axum::extract::State<Arc<Mutex<usize>>>,
    axum::Json(message): axum::Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let id = message["id"].clone();
    let result = match message["method"].as_str() {
        Some("initialize") => json!({
            "protocolVersion": "2025-06-18",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "sample-crm", "version": "1"},
        }),
        Some("tools/list") => json!({"tools": [
            {"name": "lookup_contact", "inputSchema": {"type": "object"}},
            {"name": "delete_contact", "inputSchema": {"type": "object"}},
        ]}),
        Some("tools/call") => {
            if message["params"]["name"] == "delete_contact" {
                *deleted.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            }
            json!({"content": [{"type": "text", "text": "Bob Smith, +44 20 7946 0000"}]})
        }
        _ => return axum::http::StatusCode::ACCEPTED.into_response(),
    };
    axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response()
}

// ---------------------------------------------------------------------------------------------
// The story

struct Story<'a> {
    leash: String,
    admin: String,
    mailbox: &'a Mailbox,
    crm: &'a Crm,
    session_cookie: String,
    dir: &'a std::path::Path,
    idp: Option<&'a DemoIdp>,
    args: DemoArgs,
}

/// Alice as the demo knows her.
struct Alice {
    id: String,
    key: String,
}

/// What the agent holds after the exchange.
struct Agent {
    session: AgentSession,
    raw_token: String,
    /// Every answer the agent received, to show that Alice's session never reached it.
    received: String,
}

impl Agent {
    async fn send(
        &mut self,
        method: Method,
        url: &str,
        headers: &[(String, String)],
        body: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let reply = self.session.send(&method, url, headers, body).await?;
        for (name, value) in &reply.headers {
            self.received.push_str(name.as_str());
            self.received
                .push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
        self.received.push_str(&reply.body);
        Ok(reply)
    }
}

/// The reply's JSON if it has the expected status and error code, else what happened instead.
fn expect(what: &str, reply: &Reply, status: u16, error: Option<&str>) -> anyhow::Result<Value> {
    let body: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
    let code = body["error"].as_str();
    if reply.status.as_u16() != status || (error.is_some() && code != error) {
        bail!(
            "{what}: expected {status}{}, got {}: {}",
            error.map(|e| format!(" {e}")).unwrap_or_default(),
            reply.status,
            reply.body
        );
    }
    Ok(body)
}

/// `403 insufficient_scope: …` from a refusal's body.
fn reason(reply: &Reply, body: &Value) -> String {
    format!(
        "{} {}: {}",
        reply.status.as_u16(),
        body["error"].as_str().unwrap_or("?"),
        body["error_description"].as_str().unwrap_or("")
    )
}

impl Story<'_> {
    fn remote(&self, token: &str) -> Remote {
        Remote {
            server: self.leash.clone(),
            token: Some(token.to_owned()),
        }
    }

    fn gw(&self, path: &str) -> String {
        format!("{}/gw{path}", self.leash)
    }

    async fn tell(&self) -> anyhow::Result<()> {
        let (alice, identity) = self.setup().await?;
        let (grant_id, handle) = self.delegate(&alice.key).await?;
        let mut agent = self.agent_works(&identity, &handle).await?;
        self.agent_overreaches(&mut agent).await?;
        let sent = self.approval(&alice.key, &mut agent).await?;
        self.stolen_token(&agent).await?;
        self.complete(&alice.key, &grant_id, &mut agent).await?;
        self.mcp(&alice.key, &identity).await?;
        self.audit_and_review(&alice, &grant_id, sent).await
    }

    /// Step 1: returns Alice and the agent's identity key.
    async fn setup(&self) -> anyhow::Result<(Alice, AgentKey)> {
        step(
            1,
            "Alice stores her mailbox session in the vault; the agent is registered with its own identity",
        );
        let admin = self.remote(&self.admin);
        let alice = match self.idp {
            Some(idp) => {
                // Alice is a person at the company's IdP: her calls carry its access token, and
                // Leash knows her by the IdP's (iss, sub), the same when she logs in later.
                let key = idp.alice_access_token();
                let me = call(&self.remote(&key), Method::GET, "/v1/me", None).await?;
                let Some(id) = me["id"].as_str() else {
                    bail!("GET /v1/me returned no id: {me}");
                };
                say(
                    Mark::Done,
                    format_args!(
                        "alice ({}) is known at the company's identity provider; Leash made her {id} on first sight, no API key",
                        me["name"].as_str().unwrap_or("?")
                    ),
                );
                Alice {
                    id: id.to_owned(),
                    key,
                }
            }
            None => {
                let user = call(
                    &admin,
                    Method::POST,
                    "/v1/users",
                    Some(json!({"name": "alice"})),
                )
                .await?;
                let (Some(key), Some(id)) = (user["api_key"].as_str(), user["id"].as_str()) else {
                    bail!("POST /v1/users returned no id or api_key: {user}");
                };
                say(
                    Mark::Done,
                    "the admin added the user alice (she gets her own API key)",
                );
                Alice {
                    id: id.to_owned(),
                    key: key.to_owned(),
                }
            }
        };

        let vault = json!({"kind": "cookie", "secret": self.session_cookie});
        call(
            &self.remote(&alice.key),
            Method::PUT,
            "/v1/vault/mail",
            Some(vault),
        )
        .await?;
        let listed = call(&self.remote(&alice.key), Method::GET, "/v1/vault", None).await?;
        if listed.to_string().contains(&self.session_cookie) {
            bail!("GET /v1/vault returned the secret");
        }
        say(
            Mark::Done,
            "alice put her mailbox session cookie in the vault: encrypted at rest, never shown again",
        );
        note(format!("GET /v1/vault lists metadata only: {listed}"));

        let identity = AgentKey::generate(Alg::EdDsa);
        let mut public = identity.public().to_value();
        public["alg"] = json!(identity.alg().name());
        let body = json!({"id": AGENT, "name": "Inbox triage agent", "jwks": {"keys": [public]}});
        call(&admin, Method::POST, "/v1/agents", Some(body)).await?;
        say(
            Mark::Done,
            format_args!(
                "agent {AGENT} registered with its public key (thumbprint {})",
                identity.public().thumbprint()
            ),
        );
        Ok((alice, identity))
    }

    /// Step 2: returns the grant id and its handle.
    async fn delegate(&self, alice: &str) -> anyhow::Result<(String, String)> {
        step(
            2,
            "Alice delegates \"triage my inbox\" for 15 minutes: read and draft; send needs her approval",
        );
        note("(she also grants delete, as people do \"just in case\"; the review will flag it)");
        let body = json!({
            "agent": AGENT,
            "purpose": PURPOSE,
            "upstreams": ["mail"],
            "actions": ["mail:read", "mail:draft", "mail:send", "mail:delete"],
            "approval_required": ["mail:send"],
            "ttl_seconds": 900,
        });
        let grant = call(&self.remote(alice), Method::POST, "/v1/grants", Some(body)).await?;
        let id = grant["id"].as_str().unwrap_or_default().to_owned();
        let handle = grant["handle"].as_str().unwrap_or_default().to_owned();
        if id.is_empty() || handle.is_empty() {
            bail!("POST /v1/grants returned no id or handle: {grant}");
        }
        say(
            Mark::Done,
            format_args!(
                "grant {id}: mail:read, mail:draft, mail:send (approval each time), mail:delete; expires {}",
                grant["expires_at"].as_str().unwrap_or("?")
            ),
        );
        note("the agent gets a one-task handle (lgh_…), never Alice's API key or session");
        Ok((id, handle))
    }

    /// Step 3: the token exchange and two allowed calls.
    async fn agent_works(&self, identity: &AgentKey, handle: &str) -> anyhow::Result<Agent> {
        step(
            3,
            "The agent gets a short-lived DPoP-bound token and works through the gateway",
        );
        let session = exchange(&self.remote(""), AGENT, identity, handle, None)
            .await
            .context("the token exchange failed")?;
        let raw_token = session["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        say(
            Mark::Allow,
            format_args!(
                "token exchange (RFC 8693, signed client assertion, DPoP): scope \"{}\", expires in {} s, no refresh token",
                session["scope"].as_str().unwrap_or(""),
                session["expires_in"]
            ),
        );
        let mut agent = Agent {
            session: AgentSession::from_session(&session)?,
            raw_token,
            received: String::new(),
        };

        let reply = agent
            .send(Method::GET, &self.gw("/mail/messages"), &[], None)
            .await?;
        let body = expect("reading the inbox", &reply, 200, None)?;
        let count = body["messages"].as_array().map_or(0, Vec::len);
        say(
            Mark::Allow,
            format_args!("GET /gw/mail/messages → 200, {count} messages"),
        );
        let draft = r#"{"to":"bob@example.com","body":"Friday at noon works for me."}"#;
        let reply = agent
            .send(Method::POST, &self.gw("/mail/drafts"), &[], Some(draft))
            .await?;
        expect("writing a draft", &reply, 201, None)?;
        say(
            Mark::Allow,
            "POST /gw/mail/drafts → 201, a reply to Bob drafted",
        );

        let seen = self.mailbox.seen();
        let last = seen
            .last()
            .ok_or_else(|| anyhow!("the mailbox received nothing"))?;
        if seen.len() != 2
            || seen
                .iter()
                .any(|s| s.header("cookie") != Some(&self.session_cookie))
        {
            bail!("the mailbox should have received 2 requests with Alice's session: {seen:?}");
        }
        if last.header("leash-actor") != Some(AGENT) {
            bail!("the mailbox did not learn which agent called: {last:?}");
        }
        let leaked = seen.iter().any(|s| {
            s.header("authorization").is_some()
                || s.header("dpop").is_some()
                || s.headers.iter().any(|(_, v)| v.contains(&agent.raw_token))
        });
        if leaked {
            bail!("the agent's token or proof reached the mailbox: {seen:?}");
        }
        say(
            Mark::Done,
            "the mailbox saw Alice's session cookie, injected by Leash, and who acted:",
        );
        note(format_args!(
            "Leash-Subject: {}   Leash-Actor: {}",
            last.header("leash-subject").unwrap_or("?"),
            last.header("leash-actor").unwrap_or("?")
        ));
        note("and nothing of the agent's token or DPoP proof");
        if agent.received.to_ascii_lowercase().contains("set-cookie")
            || agent.received.contains(&self.session_cookie)
        {
            bail!("the agent received session material");
        }
        say(
            Mark::Done,
            "the mailbox refreshed its cookie (Set-Cookie); Leash stripped it: the agent never held the session",
        );
        Ok(agent)
    }

    /// Step 4: outside the task.
    async fn agent_overreaches(&self, agent: &mut Agent) -> anyhow::Result<()> {
        step(
            4,
            "The agent tries to export the mailbox and to read the finance app",
        );
        let before = self.mailbox.seen().len();
        for (path, what) in [
            ("/mail/export", "exporting the mailbox"),
            ("/finance/accounts", "reading the finance app"),
        ] {
            let reply = agent.send(Method::GET, &self.gw(path), &[], None).await?;
            let body = expect(what, &reply, 403, Some("insufficient_scope"))?;
            say(
                Mark::Deny,
                format_args!("GET /gw{path} → {}", reason(&reply, &body)),
            );
        }
        if self.mailbox.seen().len() != before {
            bail!("a refused request reached the mailbox");
        }
        note("neither request reached an upstream");
        Ok(())
    }

    /// Step 5: the high-risk send waits for Alice, goes through once, and cannot be replayed.
    /// Returns whether it was sent (Alice may deny it in the interactive demo).
    async fn approval(&self, alice: &str, agent: &mut Agent) -> anyhow::Result<bool> {
        step(
            5,
            "The agent sends the reply: a high-risk action, so it waits for Alice",
        );
        let send = self.gw("/mail/messages/draft-1/send");
        let reply = agent.send(Method::POST, &send, &[], None).await?;
        let body = expect(
            "sending without approval",
            &reply,
            403,
            Some("approval_required"),
        )?;
        let id = body["approval_id"]
            .as_str()
            .ok_or_else(|| anyhow!("approval_required without an approval_id: {body}"))?
            .to_owned();
        say(
            Mark::Wait,
            format_args!("POST /gw/mail/messages/draft-1/send → 403 approval_required ({id})"),
        );
        let alice_remote = self.remote(alice);
        let path = format!("/v1/approvals/{id}");
        let pending = call(&alice_remote, Method::GET, &path, None).await?;
        note(format_args!(
            "Alice sees: {} {} {} ({}), status {}",
            pending["method"].as_str().unwrap_or("?"),
            pending["upstream"].as_str().unwrap_or("?"),
            pending["path"].as_str().unwrap_or("?"),
            pending["action"].as_str().unwrap_or("?"),
            pending["status"].as_str().unwrap_or("?"),
        ));

        let decided = if self.args.console {
            self.wait_in_console(alice, &id).await?
        } else if self.args.interactive {
            self.wait_for_alice(alice, &id).await?
        } else {
            call(
                &alice_remote,
                Method::POST,
                &format!("{path}/approve"),
                None,
            )
            .await?
        };
        let approved = decided["status"].as_str() == Some("approved");
        let approval = [("Leash-Approval".to_owned(), id.clone())];
        if !approved {
            say(Mark::Deny, format_args!("Alice denied {id}"));
            let reply = agent.send(Method::POST, &send, &approval, None).await?;
            let body = expect("sending a denied request", &reply, 403, None)?;
            say(
                Mark::Deny,
                format_args!(
                    "the send with the denied approval → {}",
                    reason(&reply, &body)
                ),
            );
        } else {
            say(
                Mark::Done,
                format_args!(
                    "Alice ({}) approved {id}, for this exact request only",
                    decided["approver"].as_str().unwrap_or("?")
                ),
            );
            let reply = agent.send(Method::POST, &send, &approval, None).await?;
            expect("sending with the approval", &reply, 200, None)?;
            say(
                Mark::Allow,
                "the same request with Leash-Approval → 200, the reply is sent",
            );
            let other = self.gw("/mail/messages/3/send");
            let reply = agent.send(Method::POST, &other, &approval, None).await?;
            let body = expect(
                "reusing the approval elsewhere",
                &reply,
                403,
                Some("approval_mismatch"),
            )?;
            say(
                Mark::Deny,
                format_args!(
                    "the approval on another message → {}",
                    reason(&reply, &body)
                ),
            );
            let reply = agent.send(Method::POST, &send, &approval, None).await?;
            let body = expect(
                "replaying the approval",
                &reply,
                403,
                Some("approval_required"),
            )?;
            say(
                Mark::Deny,
                format_args!("the approved send replayed → {}", reason(&reply, &body)),
            );
        }
        let sent = self.mailbox.count("POST", "/messages/draft-1/send");
        let expected = usize::from(approved);
        if sent != expected || self.mailbox.count("POST", "/messages/3/send") != 0 {
            bail!("the mailbox received {sent} sends, expected {expected}");
        }
        note(if sent == 1 {
            "the mailbox received the send exactly once"
        } else {
            "the mailbox received no send"
        });
        Ok(approved)
    }

    /// With --interactive: the person decides in another terminal.
    async fn wait_for_alice(&self, alice: &str, id: &str) -> anyhow::Result<Value> {
        say(
            Mark::Wait,
            "your turn: in another terminal, approve (or deny) it as Alice:",
        );
        anstream::println!(
            "\n      LEASH_URL={} LEASH_TOKEN={alice} leash approvals approve {id}\n",
            self.leash
        );
        note(format_args!(
            "(`leash approvals show {id}` shows exactly what it lets through; from a checkout, `cargo run --release --` stands for `leash`; waiting up to {} s)",
            self.args.wait
        ));
        self.decision(alice, id).await
    }

    /// `--console`: Alice decides in her browser.
    async fn wait_in_console(&self, alice: &str, id: &str) -> anyhow::Result<Value> {
        say(
            Mark::Wait,
            "your turn: open the console in a browser, sign in as Alice, and approve (or deny) it:",
        );
        anstream::println!("\n      {}/console\n", self.leash);
        note(format_args!(
            "(\"Log in\" takes you to the demo's identity provider: one click signs you in as Alice; the approval is in her inbox; waiting up to {} s)",
            self.args.wait
        ));
        self.decision(alice, id).await
    }

    /// Waits for Alice's decision on `id`, up to `--wait`.
    async fn decision(&self, alice: &str, id: &str) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(self.args.wait);
        let path = format!("/v1/approvals/{id}");
        loop {
            let approval = call(&self.remote(alice), Method::GET, &path, None).await?;
            match approval["status"].as_str() {
                Some("pending") => {}
                Some("approved" | "denied") => return Ok(approval),
                other => bail!("approval {id} is {}", other.unwrap_or("unknown")),
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "approval {id} is still pending after {} s (--wait)",
                    self.args.wait
                );
            }
            tokio::time::sleep(APPROVAL_POLL).await;
        }
    }

    /// Step 6: the token without its key is worthless.
    async fn stolen_token(&self, agent: &Agent) -> anyhow::Result<()> {
        step(
            6,
            "Someone steals a copy of the token, but not the agent's key",
        );
        let thief_key = AgentKey::generate(Alg::EdDsa);
        let thief = AgentSession::from_session(&json!({
            "access_token": agent.raw_token,
            "dpop_key": thief_key.to_private_jwk(),
        }))?;
        let mut thief = Agent {
            session: thief,
            raw_token: agent.raw_token.clone(),
            received: String::new(),
        };
        let before = self.mailbox.seen().len();
        let url = self.gw("/mail/messages");
        let reply = thief.send(Method::GET, &url, &[], None).await?;
        let body = expect(
            "the thief's own proof",
            &reply,
            401,
            Some("invalid_dpop_proof"),
        )?;
        say(
            Mark::Deny,
            format_args!("with the thief's own DPoP key → {}", reason(&reply, &body)),
        );
        let reply = crate::client::http()?
            .get(&url)
            .bearer_auth(&agent.raw_token)
            .send()
            .await?;
        let reply = Reply {
            status: reply.status(),
            headers: reply.headers().clone(),
            body: reply.text().await?,
        };
        let body = expect("the token as a Bearer token", &reply, 401, None)?;
        say(
            Mark::Deny,
            format_args!("as a plain Bearer token → {}", reason(&reply, &body)),
        );
        if self.mailbox.seen().len() != before {
            bail!("a stolen token's request reached the mailbox");
        }
        Ok(())
    }

    /// Step 7: completing the task kills its tokens.
    async fn complete(&self, alice: &str, grant: &str, agent: &mut Agent) -> anyhow::Result<()> {
        step(7, "The task is done: Alice completes it");
        let path = format!("/v1/grants/{grant}/complete");
        let done = call(&self.remote(alice), Method::POST, &path, None).await?;
        say(
            Mark::Done,
            format_args!(
                "grant {grant} is {}",
                done["status"].as_str().unwrap_or("?")
            ),
        );
        let reply = agent
            .send(Method::GET, &self.gw("/mail/messages"), &[], None)
            .await?;
        let body = expect(
            "the old token after completion",
            &reply,
            401,
            Some("invalid_token"),
        )?;
        say(
            Mark::Deny,
            format_args!(
                "the agent's next call with its token → {}",
                reason(&reply, &body)
            ),
        );
        Ok(())
    }

    /// Step 8: an MCP server behind Leash: the agent's tool calls are decided one by one.
    async fn mcp(&self, alice: &str, identity: &AgentKey) -> anyhow::Result<()> {
        step(
            8,
            "A second task through MCP: the agent may look contacts up in the CRM, nothing more",
        );
        let body = json!({
            "agent": AGENT,
            "purpose": "find Bob's phone number",
            "upstreams": ["crm"],
            "actions": ["crm:lookup"],
            "ttl_seconds": 300,
        });
        let grant = call(&self.remote(alice), Method::POST, "/v1/grants", Some(body)).await?;
        let handle = grant["handle"].as_str().unwrap_or_default();
        let session = exchange(&self.remote(""), AGENT, identity, handle, None)
            .await
            .context("the token exchange for the CRM task failed")?;
        let mut agent = Agent {
            session: AgentSession::from_session(&session)?,
            raw_token: String::new(),
            received: String::new(),
        };
        let url = format!("{}/mcp/crm", self.leash);
        let headers = [
            ("content-type".to_owned(), "application/json".to_owned()),
            (
                "accept".to_owned(),
                "application/json, text/event-stream".to_owned(),
            ),
        ];
        let mut rpc = async |message: Value| -> anyhow::Result<Value> {
            let reply = agent
                .send(Method::POST, &url, &headers, Some(&message.to_string()))
                .await?;
            expect("an MCP message through Leash", &reply, 200, None)
        };
        rpc(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "leash-demo", "version": "1"}}}),
        )
        .await?;
        let listed = rpc(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})).await?;
        let names: Vec<&str> = listed["result"]["tools"]
            .as_array()
            .map(|tools| tools.iter().filter_map(|t| t["name"].as_str()).collect())
            .unwrap_or_default();
        if names != ["lookup_contact"] {
            bail!("tools/list through Leash should show lookup_contact only: {listed}");
        }
        say(
            Mark::Allow,
            "tools/list → lookup_contact only (the server also has delete_contact; the token may not call it)",
        );
        let found = rpc(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "lookup_contact", "arguments": {"name": "Bob"}}}))
        .await?;
        if found["result"]["isError"] == json!(true) {
            bail!("lookup_contact was refused: {found}");
        }
        say(
            Mark::Allow,
            format_args!(
                "tools/call lookup_contact {{\"name\": \"Bob\"}} → {}",
                found["result"]["content"][0]["text"]
                    .as_str()
                    .unwrap_or("?")
            ),
        );
        let refused = rpc(json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
            "params": {"name": "delete_contact", "arguments": {"name": "Bob"}}}))
        .await?;
        if refused["result"]["isError"] != json!(true) || self.crm.deleted() != 0 {
            bail!("delete_contact was not refused: {refused}");
        }
        say(
            Mark::Deny,
            format_args!(
                "tools/call delete_contact → {} (a tool result the model can read; the server never saw it)",
                refused["result"]["content"][0]["text"]
                    .as_str()
                    .unwrap_or("?")
            ),
        );
        note("each call is in the audit trail as mcp.call, its arguments only as a SHA-256");
        Ok(())
    }

    /// Step 9: the trail, verified, and the access review.
    async fn audit_and_review(&self, alice: &Alice, grant: &str, sent: bool) -> anyhow::Result<()> {
        step(
            9,
            "The audit trail: who did what, for whom, with whose approval",
        );
        let admin = self.remote(&self.admin);
        let export = self.dir.join("audit.jsonl");
        let written = crate::audit::export(&admin, "jsonl", Some(&export)).await?;
        let text = std::fs::read_to_string(&export)?;
        // Identities as people read them: Alice's user id by name, the agent by its last segment.
        let who = |id: Option<&str>| -> String {
            match id {
                None => "-".into(),
                Some(id) if id == alice.id => "alice".into(),
                Some(id) => id.rsplit('/').next().unwrap_or(id).to_owned(),
            }
        };
        let row = |[
            seq,
            kind,
            mode,
            human,
            agent,
            action,
            request,
            decision,
            approver,
        ]: [&str; 9]| {
            anstream::println!(
                "   {seq:>3}  {kind:<17}  {mode:<9}  {human:<5}  {agent:<12}  {action:<12}  {request:<32}  {decision:<24}  {approver}"
            );
        };
        row([
            "seq", "event", "mode", "human", "agent", "action", "request", "decision", "approver",
        ]);
        for line in text
            .lines()
            .filter(|l| !l.starts_with(r#"{"checkpoint":"#) && !l.starts_with(r#"{"key":"#))
        {
            let e: AuditEvent = serde_json::from_str(line)?;
            let request = match (&e.method, &e.upstream, &e.path) {
                (Some(method), Some(upstream), Some(path)) => {
                    format!("{method} /{upstream}{path}")
                }
                _ => "-".into(),
            };
            let action = match (&e.action, &e.method) {
                // Grants and tokens carry the whole scope; the table keeps a request's action.
                (Some(action), Some(_)) => action.clone(),
                (Some(_), None) => "(the task's)".into(),
                (None, _) => "-".into(),
            };
            let decision = match (e.decision, &e.reason) {
                // The approval id, or the outcome's own name again.
                (Some(d), Some(r)) if r.starts_with("apr_") || r == crate::audit::outcome(d) => {
                    crate::audit::outcome(d).to_owned()
                }
                (Some(d), Some(r)) => format!("{}: {r}", crate::audit::outcome(d)),
                (Some(d), None) => crate::audit::outcome(d).to_owned(),
                (None, _) => "-".into(),
            };
            row([
                &e.seq.to_string(),
                &e.kind,
                e.mode.as_str(),
                &who(e.subject.as_deref()),
                &who(e.actor.as_deref()),
                &action,
                &truncate(&request, 32),
                &truncate(&decision, 24),
                &who(e.approver.as_deref()),
            ]);
        }
        let keys =
            crate::audit::load_jwks(&format!("{}/.well-known/jwks.json", self.leash)).await?;
        let verified = crate::audit::verify_file(&export, &keys, false)?;
        if verified != written {
            bail!("verified {verified} events of the {written} exported");
        }
        say(
            Mark::Done,
            format_args!(
                "hash chain and signed checkpoints verified over all {verified} events (leash audit verify)"
            ),
        );

        heading("   Access review: granted against used");
        let review = call(&self.remote(&alice.key), Method::GET, "/v1/review", None).await?;
        let row = review["grants"]
            .as_array()
            .and_then(|rows| rows.iter().find(|g| g["id"] == grant))
            .ok_or_else(|| anyhow!("the review does not list grant {grant}: {review}"))?;
        let used: Vec<String> = row["actions_used"]
            .as_array()
            .map(|used| {
                used.iter()
                    .map(|u| format!("{} ×{}", u["action"].as_str().unwrap_or("?"), u["count"]))
                    .collect()
            })
            .unwrap_or_default();
        let unused: Vec<&str> = row["actions_unused"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        say(Mark::Done, format_args!("used: {}", used.join(", ")));
        let expected: &[&str] = if sent {
            &["mail:delete"]
        } else {
            &["mail:send", "mail:delete"]
        };
        if unused != expected {
            bail!("the review should name {expected:?} as unused: {row}");
        }
        say(
            Mark::Flag,
            format_args!(
                "never used: {} — the next grant for this task can leave it out",
                unused.join(", ")
            ),
        );
        Ok(())
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max - 1).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests abort loudly on failure")]

    use super::*;

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: reqwest::header::HeaderMap::new(),
            body: body.to_owned(),
        }
    }

    /// The demo's self-check: any other status or error code than the story's ends the demo.
    #[test]
    fn an_outcome_other_than_the_expected_one_fails_the_step() {
        let refused = reply(
            403,
            r#"{"error":"insufficient_scope","error_description":"no"}"#,
        );
        assert!(expect("x", &refused, 403, Some("insufficient_scope")).is_ok());
        assert!(expect("x", &refused, 403, None).is_ok());
        let wrong_code = expect("export", &refused, 403, Some("policy_denied")).unwrap_err();
        assert!(
            wrong_code
                .to_string()
                .contains("expected 403 policy_denied, got 403"),
            "{wrong_code}"
        );
        let allowed = reply(200, r#"{"messages":[]}"#);
        assert!(expect("export", &allowed, 403, Some("insufficient_scope")).is_err());
        assert!(expect("read", &allowed, 201, None).is_err());
        assert!(expect("read", &reply(500, "boom"), 200, None).is_err());
    }

    #[test]
    fn long_cells_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("approval_required", 32), "approval_required");
        assert_eq!(truncate("é".repeat(40).as_str(), 5), "éééé…");
    }
}
