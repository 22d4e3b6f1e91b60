//! `leash audit tail|export|verify`: follow the trail, export it (JSON lines with their signed
//! checkpoints first, or OCSF), and check a chain offline, from an export or a database.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::Subcommand;
use leash_core::audit::{AuditEvent, ChainVerifier, Checkpoint};
use leash_core::jwk::{PublicJwk, parse_jwks};
use serde_json::{Value, json};

use crate::Remote;
use crate::client::{base, bearer, http, json_or_error};

/// `leash audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print audit events as they are appended (admin: all; a human: their own).
    Tail {
        /// Start after this seq.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Only this grant's events.
        #[arg(long)]
        grant: Option<String>,
        /// Only this actor's events.
        #[arg(long)]
        actor: Option<String>,
        /// Only events on behalf of this human (usr_…).
        #[arg(long)]
        subject: Option<String>,
        /// Print what is there now and exit instead of following.
        #[arg(long)]
        once: bool,
        /// Print the events as stored (JSON lines).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Export the whole trail (admin key), up to a checkpoint signed for the export.
    Export {
        /// `jsonl`: the events as hashed, with their signed checkpoints first (what
        /// `leash audit verify` checks); `ocsf`: OCSF API Activity (class 6003) records.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "ocsf"])]
        format: String,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Check the hash chain and the checkpoint signatures of an export or of a database; prints
    /// the first bad seq and exits non-zero if anything was edited, removed, inserted,
    /// reordered or cut off.
    Verify {
        /// An export made by `leash audit export` (JSON lines).
        #[arg(required_unless_present = "database", conflicts_with = "database")]
        file: Option<PathBuf>,
        /// A database URL (sqlite://PATH) instead of a file.
        #[arg(long)]
        database: Option<String>,
        /// The JWKS (file or http(s) URL) whose keys signed the checkpoints. Default: with
        /// --database, every key the database has had; for a file, the server's published JWKS
        /// and, with an admin key (LEASH_TOKEN), every key it has had (`leash keys list`).
        #[arg(long)]
        jwks: Option<String>,
        /// Also accept, for checkpoints signed by a key none of the above holds (withdrawn
        /// since), the public key the export carries. Such keys are named: compare them with
        /// `leash keys list`, since whoever could edit the export could also replace them.
        #[arg(long)]
        trust_export_keys: bool,
        /// Data directory holding master.key (with --database).
        #[arg(long, env = "LEASH_DATA_DIR", default_value = ".leash")]
        data_dir: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Runs an audit verb.
pub async fn audit(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Tail {
            since,
            grant,
            actor,
            subject,
            once,
            json,
            remote,
        } => {
            let filters = [("grant_id", grant), ("actor", actor), ("subject", subject)];
            tail(&remote, since, &filters, once, json).await
        }
        AuditCommand::Export {
            format,
            output,
            remote,
        } => {
            let written = export(&remote, &format, output.as_deref()).await?;
            if let Some(path) = output {
                eprintln!("exported {written} events to {}", path.display());
            }
            Ok(())
        }
        AuditCommand::Verify {
            file,
            database,
            jwks,
            mut trust_export_keys,
            data_dir,
            remote,
        } => {
            let verified = match (file, database) {
                (Some(file), _) => {
                    let keys = match jwks {
                        Some(source) => load_jwks(&source).await?,
                        None => {
                            let mut keys =
                                load_jwks(&format!("{}/.well-known/jwks.json", base(&remote)))
                                    .await?;
                            let every = every_key(&remote).await;
                            if !every.is_empty() {
                                // The server's whole list: a key it never had, carried by the
                                // export, can only be a forgery.
                                if trust_export_keys {
                                    eprintln!(
                                        "--trust-export-keys ignored: the server listed every key it has had"
                                    );
                                }
                                trust_export_keys = false;
                            }
                            keys.extend(every);
                            keys
                        }
                    };
                    verify_file(&file, &keys, trust_export_keys)?
                }
                (None, Some(url)) => verify_database(&url, jwks, &data_dir, &remote).await?,
                (None, None) => bail!("name an export file or --database"),
            };
            println!("audit chain verified: {verified} events, every checkpoint signature valid");
            Ok(())
        }
    }
}

async fn get_lines(
    remote: &Remote,
    path: &str,
    query: &[(&str, String)],
) -> anyhow::Result<String> {
    let url = format!("{}{path}", base(remote));
    let response = http()?
        .get(&url)
        .bearer_auth(bearer(remote)?)
        .query(query)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    if !response.status().is_success() {
        json_or_error(response).await?;
        bail!("unexpected answer from {url}");
    }
    response.text().await.context("cannot read the response")
}

/// Largest page asked of the server.
const PAGE: u32 = 10_000;

async fn tail(
    remote: &Remote,
    mut since: u64,
    filters: &[(&str, Option<String>)],
    once: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if !json {
        writeln!(
            stdout,
            "{:>6}  {:<20}  {:<18}  {:<9}  {:<17}  {:<24}  {:<36}  ACTION / PATH",
            "SEQ", "TIME", "KIND", "MODE", "DECISION", "SUBJECT", "ACTOR"
        )?;
    }
    loop {
        let mut query: Vec<(&str, String)> = vec![
            ("since_seq", since.to_string()),
            ("limit", PAGE.to_string()),
        ];
        for (name, value) in filters {
            if let Some(value) = value {
                query.push((name, value.clone()));
            }
        }
        let text = get_lines(remote, "/v1/audit", &query).await?;
        let mut count = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let event: AuditEvent =
                serde_json::from_str(line).context("the server sent a malformed event")?;
            since = event.seq;
            count += 1;
            if json {
                writeln!(stdout, "{line}")?;
            } else {
                writeln!(stdout, "{}", event_row(&event))?;
            }
        }
        stdout.flush()?;
        if count < PAGE as usize {
            if once {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

fn event_row(e: &AuditEvent) -> String {
    let decision = match (e.decision, &e.reason) {
        (Some(d), Some(r)) => format!("{}: {r}", outcome(d)),
        (Some(d), None) => outcome(d).to_owned(),
        (None, _) => "-".to_owned(),
    };
    let what = match (&e.action, &e.method, &e.upstream, &e.path) {
        (action, Some(method), Some(upstream), Some(path)) => format!(
            "{} {method} {upstream}{path}",
            action.as_deref().unwrap_or("-")
        ),
        (Some(action), ..) => action.clone(),
        _ => e.upstream.clone().unwrap_or_else(|| "-".into()),
    };
    let approver = e
        .approver
        .as_deref()
        .map(|a| format!("  approved by {a}"))
        .unwrap_or_default();
    format!(
        "{:>6}  {:<20}  {:<18}  {:<9}  {:<17}  {:<24}  {:<36}  {what}{approver}",
        e.seq,
        e.ts,
        e.kind,
        e.mode.as_str(),
        decision,
        e.subject.as_deref().unwrap_or("-"),
        e.actor.as_deref().unwrap_or("-"),
    )
}

pub(crate) fn outcome(o: leash_core::audit::Outcome) -> &'static str {
    match o {
        leash_core::audit::Outcome::Allow => "allow",
        leash_core::audit::Outcome::Deny => "deny",
        leash_core::audit::Outcome::ApprovalRequired => "approval_required",
    }
}

/// Writes the log up to a checkpoint signed now; returns the number of events written.
pub(crate) async fn export(
    remote: &Remote,
    format: &str,
    output: Option<&Path>,
) -> anyhow::Result<u64> {
    // A checkpoint signed now covers every event the export holds, so that a cut-off tail
    // of the exported file is caught.
    let url = format!("{}/v1/audit/checkpoints", base(remote));
    let response = http()?
        .post(&url)
        .bearer_auth(bearer(remote)?)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let last: Option<Checkpoint> = serde_json::from_value(json_or_error(response).await?)
        .context("the server sent a malformed checkpoint")?;
    let end = last.as_ref().map_or(0, |c| c.seq);
    let mut out: Box<dyn std::io::Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let progress = indicatif::ProgressBar::new(end);
    progress.set_style(
        indicatif::ProgressStyle::with_template("exporting {bar:40} {pos}/{len} events")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if format == "jsonl" {
        // Every signing key there has been: checkpoints signed before a rotation verify with
        // keys the server no longer publishes.
        let keys = crate::client::call(remote, reqwest::Method::GET, "/v1/keys", None).await?;
        for key in keys["keys"].as_array().into_iter().flatten() {
            let mut jwk = key["jwk"].clone();
            jwk["kid"] = key["kid"].clone();
            writeln!(out, "{}", json!({ "key": jwk }))?;
        }
        let text = get_lines(remote, "/v1/audit/checkpoints", &[]).await?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let checkpoint: Checkpoint =
                serde_json::from_str(line).context("the server sent a malformed checkpoint")?;
            if checkpoint.seq <= end {
                writeln!(out, "{}", json!({ "checkpoint": checkpoint }))?;
            }
        }
    }
    let mut since = 0;
    while since < end {
        let query = [
            ("since_seq", since.to_string()),
            ("limit", PAGE.to_string()),
        ];
        let text = get_lines(remote, "/v1/audit", &query).await?;
        let mut got = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let event: AuditEvent =
                serde_json::from_str(line).context("the server sent a malformed event")?;
            if event.seq > end {
                break;
            }
            since = event.seq;
            got += 1;
            if format == "ocsf" {
                writeln!(out, "{}", ocsf(&event))?;
            } else {
                writeln!(out, "{line}")?;
            }
        }
        progress.set_position(since);
        if got == 0 {
            bail!("the server's log ended at seq {since} before the checkpoint at {end}");
        }
    }
    out.flush()?;
    progress.finish_and_clear();
    Ok(end)
}

/// One event as an OCSF 1.x API Activity record (class 6003, category 6 Application
/// Activity); Leash's own members that OCSF has no place for go under `unmapped`.
fn ocsf(e: &AuditEvent) -> Value {
    let activity_id = match e.kind.rsplit('.').next() {
        Some("created" | "registered" | "stored" | "issued" | "exchange") => 1,
        Some("request") if e.method.as_deref() == Some("GET") => 2,
        Some("request" | "approved" | "denied" | "completed" | "disabled") => 3,
        Some("revoked" | "deleted") => 4,
        _ => 99,
    };
    let (status, status_id) = match e.decision {
        Some(leash_core::audit::Outcome::Deny) => ("Failure", 2),
        Some(leash_core::audit::Outcome::ApprovalRequired) => ("Other", 99),
        _ => ("Success", 1),
    };
    let time = time::OffsetDateTime::parse(&e.ts, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp() * 1000)
        .unwrap_or(0);
    json!({
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "type_uid": 600300 + activity_id,
        "time": time,
        "severity_id": if status_id == 2 { 3 } else { 1 },
        "status": status,
        "status_id": status_id,
        "status_detail": e.reason,
        "metadata": {
            "version": "1.3.0",
            "product": {"name": "Leash", "vendor_name": "Leash"},
            "uid": e.hash,
            "sequence": e.seq,
            "correlation_uid": e.grant_id,
        },
        "actor": {
            "user": {"uid": e.subject, "type": "User"},
            "app_name": e.actor,
            "invoked_by": e.approver,
        },
        "api": {
            "operation": e.kind,
            "request": {"uid": e.request_id},
            "service": {"name": e.upstream},
        },
        "http_request": e.method.as_ref().map(|m| json!({
            "http_method": m,
            "url": {"path": e.path},
        })),
        "unmapped": {
            "mode": e.mode.as_str(),
            "action": e.action,
            "purpose": e.purpose,
            "policies": e.policies,
            "decision": e.decision.map(outcome),
            "prev_hash": e.prev_hash,
        },
    })
}

pub(crate) async fn load_jwks(source: &str) -> anyhow::Result<Vec<(String, PublicJwk)>> {
    let value: Value = if source.starts_with("http://") || source.starts_with("https://") {
        let response = http()?
            .get(source)
            .send()
            .await
            .with_context(|| format!("cannot fetch the JWKS at {source}"))?;
        json_or_error(response).await?
    } else {
        let text = std::fs::read_to_string(source)
            .with_context(|| format!("cannot read the JWKS file {source}"))?;
        serde_json::from_str(&text).with_context(|| format!("{source} is not JSON"))?
    };
    let keys = parse_jwks(&value).map_err(|e| anyhow!("{source}: {e}"))?;
    let kids = value["keys"]
        .as_array()
        .map(|keys| keys.iter().map(|k| k["kid"].as_str().map(str::to_owned)))
        .into_iter()
        .flatten();
    Ok(kids
        .zip(keys)
        .map(|(kid, key)| (kid.unwrap_or_else(|| key.thumbprint()), key))
        .collect())
}

/// The trusted keys, and of the keys an export carries those whose kid signed one of its
/// checkpoints and is not among the trusted ones (named on stderr).
fn with_carried(
    trusted: &[(String, PublicJwk)],
    carried: &[(String, PublicJwk)],
    checkpoints: &[Checkpoint],
) -> Vec<(String, PublicJwk)> {
    let mut keys = trusted.to_vec();
    for (kid, key) in carried {
        let needed = checkpoints.iter().any(|c| &c.kid == kid);
        if needed && !trusted.iter().any(|(k, _)| k == kid) {
            eprintln!(
                "checkpoints signed by {kid} verify with the key the export carries (no longer published); compare it with `leash keys list`"
            );
            keys.push((kid.clone(), key.clone()));
        }
    }
    keys
}

fn find<'k>(keys: &'k [(String, PublicJwk)]) -> impl Fn(&str) -> Option<PublicJwk> + 'k {
    move |kid| {
        keys.iter()
            .find(|(k, _)| k == kid)
            .map(|(_, key)| key.clone())
    }
}

fn broken(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("audit chain broken at {e}")
}

/// Checks an export: its checkpoint lines (which come first), then each event in order.
/// Every signing key the server has had (`GET /v1/keys`), when the caller's key may ask: none
/// otherwise.
async fn every_key(remote: &Remote) -> Vec<(String, PublicJwk)> {
    if remote.token.is_none() {
        return Vec::new();
    }
    let Ok(listed) = crate::client::call(remote, reqwest::Method::GET, "/v1/keys", None).await
    else {
        return Vec::new();
    };
    listed["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| {
            let kid = k["kid"].as_str()?.to_owned();
            PublicJwk::from_value(&k["jwk"]).ok().map(|key| (kid, key))
        })
        .collect()
}

pub(crate) fn verify_file(
    path: &Path,
    keys: &[(String, PublicJwk)],
    trust_export_keys: bool,
) -> anyhow::Result<u64> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let progress = indicatif::ProgressBar::new(size);
    progress.set_style(
        indicatif::ProgressStyle::with_template("verifying {bar:40} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    // Keys the export carries serve only when asked (`--trust_export_keys`), only for kids the
    // trusted keys lack (keys withdrawn since), and each one used is named.
    let mut carried: Vec<(String, PublicJwk)> = Vec::new();
    let mut keys: Vec<(String, PublicJwk)> = keys.to_vec();
    let mut checkpoints = Vec::new();
    let mut verifier = None;
    let mut line = String::new();
    let mut read = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        if read % (1 << 20) < n as u64 {
            progress.set_position(read);
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            continue;
        }
        if text.starts_with(r#"{"key":"#) {
            if verifier.is_some() || !checkpoints.is_empty() {
                bail!("a key line after the checkpoints: not an export of `leash audit export`");
            }
            let value: Value = serde_json::from_str(text).context("malformed key line")?;
            let kid = value["key"]["kid"]
                .as_str()
                .context("a key line without kid")?
                .to_owned();
            let key =
                PublicJwk::from_value(&value["key"]).map_err(|e| anyhow!("key {kid}: {e}"))?;
            carried.push((kid, key));
            continue;
        }
        if text.starts_with(r#"{"checkpoint":"#) {
            if verifier.is_some() {
                bail!("a checkpoint line after the events: not an export of `leash audit export`");
            }
            let value: Value = serde_json::from_str(text).context("malformed checkpoint line")?;
            let checkpoint: Checkpoint = serde_json::from_value(value["checkpoint"].clone())
                .context("malformed checkpoint line")?;
            checkpoints.push(checkpoint);
            continue;
        }
        let chain = match &mut verifier {
            Some(chain) => chain,
            None => {
                if trust_export_keys {
                    keys = with_carried(&keys, &carried, &checkpoints);
                }
                verifier.insert(
                    ChainVerifier::new(&checkpoints, find(&keys)).map_err(|e| anyhow!("{e}"))?,
                )
            }
        };
        chain.push(text).map_err(broken)?;
    }
    progress.finish_and_clear();
    let chain = match verifier {
        Some(chain) => chain,
        None => {
            if trust_export_keys {
                keys = with_carried(&keys, &carried, &checkpoints);
            }
            ChainVerifier::new(&checkpoints, find(&keys)).map_err(|e| anyhow!("{e}"))?
        }
    };
    if checkpoints.is_empty() && chain.verified() > 0 {
        bail!("the export holds no signed checkpoint: its end cannot be checked");
    }
    chain.finish().map_err(broken)
}

async fn verify_database(
    url: &str,
    jwks: Option<String>,
    data_dir: &Path,
    remote: &Remote,
) -> anyhow::Result<u64> {
    // Read-only: beside a live server this neither migrates nor appends to the chain.
    let store = leash_store::open_audit_reader(url).await.map_err(|e| {
        let url = leash_store::display_url(url);
        anyhow!("cannot open database {url}: {e}")
    })?;
    let stored = store.signing_public_keys().await?;
    let keys = match jwks {
        Some(source) => load_jwks(&source).await?,
        // Every key there has been, withdrawn ones included: checkpoints verify across
        // rotations, without the master key.
        None if !stored.is_empty() => stored
            .iter()
            .map(|(kid, jwk)| {
                let value: Value = serde_json::from_str(jwk)
                    .map_err(|e| anyhow!("stored key {kid} is not JSON: {e}"))?;
                let key =
                    PublicJwk::from_value(&value).map_err(|e| anyhow!("stored key {kid}: {e}"))?;
                Ok((kid.clone(), key))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => match local_key(&store, data_dir).await? {
            Some(key) => vec![(key.kid().to_owned(), key.public())],
            None => load_jwks(&format!("{}/.well-known/jwks.json", base(remote))).await?,
        },
    };
    let checkpoints = store.checkpoints(0).await?;
    let mut chain = ChainVerifier::new(&checkpoints, find(&keys)).map_err(|e| anyhow!("{e}"))?;
    let progress = indicatif::ProgressBar::new(checkpoints.last().map_or(0, |c| c.seq));
    progress.set_style(
        indicatif::ProgressStyle::with_template("verifying {bar:40} {pos}/{len} events")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let query = leash_store::AuditQuery {
            since_seq: chain.verified(),
            limit: PAGE,
            ..leash_store::AuditQuery::default()
        };
        let lines = store.audit_lines(&query).await?;
        for line in &lines {
            chain.push(line).map_err(broken)?;
        }
        progress.set_position(chain.verified());
        if lines.len() < PAGE as usize {
            break;
        }
    }
    progress.finish_and_clear();
    chain.finish().map_err(broken)
}

/// The database's signing key, if the master key is at hand (LEASH_MASTER_KEY or
/// DATA_DIR/master.key).
async fn local_key(
    store: &leash_store::AuditReader,
    data_dir: &Path,
) -> anyhow::Result<Option<leash_core::token::SigningKey>> {
    let encoded = match std::env::var(leash_server::config::ENV_MASTER_KEY) {
        Ok(value) if !value.is_empty() => value,
        _ => match std::fs::read_to_string(data_dir.join("master.key")) {
            Ok(text) => text,
            Err(_) => return Ok(None),
        },
    };
    let master = leash_core::aead::MasterKey::from_base64(&encoded)
        .map_err(|e| anyhow!("master key: {e}"))?;
    leash_server::bootstrap::stored_signing_key(store, &master).await
}

/// `leash review`: granted against used, per grant, and standing access per agent.
pub async fn review(remote: &Remote, as_json: bool) -> anyhow::Result<()> {
    let url = format!("{}/v1/review", base(remote));
    let response = http()?
        .get(&url)
        .bearer_auth(bearer(remote)?)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let review = json_or_error(response).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&review)?);
        return Ok(());
    }
    let list = |v: &Value| -> String {
        let items: Vec<&str> = v
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if items.is_empty() {
            "-".into()
        } else {
            items.join(" ")
        }
    };
    println!(
        "{:<28}  {:<36}  {:<9}  {:<30}  {:<30}  {:<9}  FLAG",
        "GRANT", "AGENT", "STATUS", "USED (COUNT)", "NEVER USED", "APPROVALS"
    );
    for grant in review["grants"].as_array().into_iter().flatten() {
        let used: Vec<String> = grant["actions_used"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|u| format!("{}({})", u["action"].as_str().unwrap_or("?"), u["count"]))
            .collect();
        let used = if used.is_empty() {
            "-".into()
        } else {
            used.join(" ")
        };
        let flag = if grant["over_broad"] == true {
            format!(
                "over-broad: {:.0}% of its actions never used",
                grant["unused_share"].as_f64().unwrap_or(0.0) * 100.0
            )
        } else {
            String::new()
        };
        println!(
            "{:<28}  {:<36}  {:<9}  {:<30}  {:<30}  {:<9}  {flag}",
            grant["id"].as_str().unwrap_or("?"),
            grant["agent"].as_str().unwrap_or("?"),
            grant["status"].as_str().unwrap_or("?"),
            used,
            list(&grant["actions_unused"]),
            format!(
                "{}/{}",
                grant["approvals"]["given"], grant["approvals"]["asked"]
            ),
        );
    }
    println!();
    println!(
        "{:<36}  {:<11}  {:<40}  FLAG",
        "AGENT", "LIVE GRANTS", "LIVE ACTIONS"
    );
    for agent in review["agents"].as_array().into_iter().flatten() {
        let count = agent["live_grants"].as_array().map_or(0, Vec::len);
        let flag = if agent["standing"] == true {
            format!(
                "standing access: live grant since {}",
                agent["oldest_live_grant_at"].as_str().unwrap_or("?")
            )
        } else {
            String::new()
        };
        println!(
            "{:<36}  {:<11}  {:<40}  {flag}",
            agent["agent"].as_str().unwrap_or("?"),
            count,
            list(&agent["live_actions"]),
        );
    }
    Ok(())
}
