//! `leash`: the one binary. `serve` runs the broker and gateway; the other verbs are a small
//! client for admins, humans and agents so Leash can be tried without writing code.

mod audit;
mod backup;
mod client;
mod demo;
mod demo_idp;
mod keys;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use leash_server::config::{self, Config, Flags};

#[derive(Debug, Parser)]
#[command(
    name = "leash",
    version,
    about = "Safe delegation for AI agents: task-scoped, key-bound tokens, a policy gateway, approvals and an audit trail."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the server is and whose API key to use (for every client verb).
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// Leash server base URL.
    #[arg(
        long,
        env = "LEASH_URL",
        default_value = "http://127.0.0.1:8470",
        global = true
    )]
    pub server: String,
    /// API key (admin or human) sent as `Authorization: Bearer`.
    #[arg(long, env = "LEASH_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Leash server (embedded SQLite by default).
    Serve(ServeArgs),
    /// Manage human users (admin key).
    #[command(subcommand)]
    User(client::UserCommand),
    /// Agent identity and agent-side calls.
    #[command(subcommand)]
    Agent(client::AgentCommand),
    /// Delegate tasks to agents, list, revoke and complete them (human key).
    #[command(subcommand)]
    Grant(client::GrantCommand),
    /// See, approve and deny the high-risk requests agents wait on (human key).
    #[command(subcommand)]
    Approvals(client::ApprovalsCommand),
    /// Follow, export and verify the tamper-evident audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Access review: actions granted against actions used, and standing access.
    Review {
        /// Print the review as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Download a consistent copy of a running server's store (admin key; SQLite).
    Backup(backup::BackupArgs),
    /// Put a backup back into an empty data dir (or mark a PostgreSQL database restored with
    /// pg_restore); the first start after it revokes what was live (a restore is a rollback).
    Restore(backup::RestoreArgs),
    /// Rotate and list the token-signing keys (admin key).
    #[command(subcommand)]
    Keys(client::KeysCommand),
    /// The forward proxy for browser agents: its CA certificate.
    #[command(subcommand)]
    Proxy(client::ProxyCommand),
    /// Operations on the master key that seals secrets at rest (server stopped).
    #[command(subcommand, name = "master-key")]
    MasterKey(keys::MasterKeyCommand),
    /// Check Cedar policies against the Leash schema.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Walk through the whole story on a temporary store: delegate, act, approve, refuse,
    /// revoke, audit (exits non-zero if any step does not behave as expected).
    Demo(demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate every *.cedar file of DIR against the schema of the configured upstreams.
    Check {
        /// The policy directory.
        dir: PathBuf,
        /// Config file whose upstreams define the actions; also LEASH_CONFIG.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn policy(cmd: PolicyCommand) -> anyhow::Result<()> {
    let PolicyCommand::Check { dir, config } = cmd;
    let flags = Flags {
        config,
        ..Flags::default()
    };
    let config = Config::load(&flags, |name| {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    })?;
    let engine =
        leash_policy::PolicyEngine::load(&leash_server::state::all_actions(&config), Some(&dir))?;
    println!(
        "{}: {} policies valid",
        dir.display(),
        engine.operator_policies()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Config file (TOML); also LEASH_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8470]; also LEASH_LISTEN.
    #[arg(long)]
    listen: Option<String>,
    /// Database URL [default: sqlite://<data dir>/leash.db]; also LEASH_DATABASE.
    #[arg(long)]
    database: Option<String>,
    /// Data directory [default: ./.leash]; also LEASH_DATA_DIR.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(config::ENV_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // The cookie jar's library logs the cookies it stores, values included, and the
        // WebSocket library the frames it relays: never.
        .add_directive(
            "cookie_store=off"
                .parse()
                .unwrap_or_else(|_| unreachable!("a fixed directive")),
        )
        .add_directive(
            "tungstenite=off"
                .parse()
                .unwrap_or_else(|_| unreachable!("a fixed directive")),
        )
        .add_directive(
            "tokio_tungstenite=off"
                .parse()
                .unwrap_or_else(|_| unreachable!("a fixed directive")),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person watching; a file or a log collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Registers SIGTERM and SIGINT handlers now (so a signal that arrives right after start is not
/// lost) and resolves when either arrives.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let flags = Flags {
        config: args.config,
        listen: args.listen,
        database: args.database,
        data_dir: args.data_dir,
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let config = Config::load(&flags, env)?;
    if args.check {
        let policies = leash_server::state::load_policy(&config)?;
        println!(
            "configuration is valid ({} upstreams, {} operator policies)",
            config.upstreams.len(),
            policies.operator_policies()
        );
        return Ok(());
    }
    let secrets = leash_server::Secrets {
        admin_token: env(config::ENV_ADMIN_TOKEN).map(leash_core::secret::Secret::new),
        master_key: env(config::ENV_MASTER_KEY),
    };
    leash_server::run(
        config,
        secrets,
        Arc::new(leash_core::SystemClock),
        |started| {
            if let Some(key) = &started.generated_admin_key {
                // Shown once, by design: it is stored only as a hash.
                println!("admin API key (shown once, store it now): {}", key.expose());
            }
            println!(
                "leash listening on {} (issuer {})",
                started.addr, started.issuer
            );
            tracing::info!(addr = %started.addr, issuer = %started.issuer, "listening");
            if let Some(proxy) = started.proxy_addr {
                println!("leash proxy listening on {proxy}");
                tracing::info!(addr = %proxy, "proxy listening");
            }
        },
        shutdown_signal()?,
    )
    .await
}

/// Per-thread caches: requests allocate on one worker and often free on another (or on the
/// store's writer thread), where glibc's allocator takes the other arena's lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::User(cmd) => client::user(cmd).await,
        Command::Agent(cmd) => client::agent(cmd).await,
        Command::Grant(cmd) => client::grant(cmd).await,
        Command::Approvals(cmd) => client::approvals(cmd).await,
        Command::Audit(cmd) => audit::audit(cmd).await,
        Command::Review { json, remote } => audit::review(&remote, json).await,
        Command::Policy(cmd) => policy(cmd),
        Command::MasterKey(cmd) => keys::master_key(cmd).await,
        Command::Keys(cmd) => client::keys(cmd).await,
        Command::Proxy(cmd) => client::proxy(cmd).await,
        Command::Backup(args) => backup::backup(args).await,
        Command::Restore(args) => backup::restore(args).await,
        Command::Demo(args) => demo::demo(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leash: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
