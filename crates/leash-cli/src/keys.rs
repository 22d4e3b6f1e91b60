//! `leash master-key …`: re-seals a store under a new master key (API §3), offline on a
//! stopped server's store, or online through a running node (`--online`).

use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use leash_core::aead::MasterKey;
use leash_core::audit::{AuditEvent, Mode};
use leash_server::config::{self, Config, Flags};
use leash_server::files::{IfExists, write_private};
use leash_server::master::{NEXT_MASTER_KEY_FILE, ensure_named, read_private_key, rotate};
use serde_json::json;

use crate::Remote;

/// `leash master-key …`.
#[derive(Debug, clap::Subcommand)]
pub enum MasterKeyCommand {
    /// Re-seal everything sealed (signing keys, vault, OAuth connections, approval previews)
    /// under a new master key, in one transaction; a failure or a crash midway leaves the old
    /// key valid.
    ///
    /// Offline (the default), on a stopped server's store: with the key in
    /// DATA_DIR/master.key, that file is replaced; with LEASH_MASTER_KEY, set it to the new key
    /// before starting again.
    ///
    /// Online (--online), while every node serves: first put the new key in every node's
    /// DATA_DIR/master.key.next (mode 0600; --data-dir does it for this machine's node); the
    /// node at LEASH_URL then re-seals, and every node switches to the staged key within 1 s.
    Rotate {
        /// The new key: base64 of 32 random bytes (e.g. `openssl rand -base64 32 > new.key`),
        /// in a file only its owner can read.
        #[arg(long)]
        new_key_file: PathBuf,
        /// Rotate through the running server at LEASH_URL (admin key in LEASH_TOKEN).
        #[arg(long)]
        online: bool,
        /// Config file (TOML); also LEASH_CONFIG.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Database URL [default: sqlite://<data dir>/leash.db]; also LEASH_DATABASE.
        #[arg(long)]
        database: Option<String>,
        /// Data directory [default: ./.leash]; also LEASH_DATA_DIR. With --online, the new key
        /// is staged in it only when given.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a key file's id: what rotations, the audit and the logs call it (the key stays
    /// secret).
    Id {
        /// The key file.
        #[arg(long)]
        key_file: PathBuf,
    },
}

/// A private key file, which must exist.
fn read_key(path: &std::path::Path) -> anyhow::Result<MasterKey> {
    read_private_key(path)?
        .ok_or_else(|| anyhow!("cannot read the key file {}: not found", path.display()))
}

/// Runs `leash master-key …`.
pub async fn master_key(cmd: MasterKeyCommand) -> anyhow::Result<()> {
    let (new_key_file, online, config, database, data_dir, remote) = match cmd {
        MasterKeyCommand::Id { key_file } => {
            println!("{}", read_key(&key_file)?.id());
            return Ok(());
        }
        MasterKeyCommand::Rotate {
            new_key_file,
            online,
            config,
            database,
            data_dir,
            remote,
        } => (new_key_file, online, config, database, data_dir, remote),
    };
    let new = read_key(&new_key_file)?;
    if online {
        if let Some(dir) = &data_dir {
            let staged = dir.join(NEXT_MASTER_KEY_FILE);
            write_private(&staged, new.to_base64().as_bytes(), IfExists::Replace)?;
            eprintln!("staged the new key in {}", staged.display());
        }
        let answer = crate::client::call(
            &remote,
            reqwest::Method::POST,
            "/v1/master-key/rotate",
            Some(json!({ "new_key_id": new.id() })),
        )
        .await?;
        crate::client::print(&answer);
        eprintln!(
            "every node switches within 1 s; a node without the key in its {NEXT_MASTER_KEY_FILE} reports itself not ready (GET /readyz)"
        );
        return Ok(());
    }
    let flags = Flags {
        config,
        database,
        data_dir,
        ..Flags::default()
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let config = Config::load(&flags, env)?;
    let from_env = env(config::ENV_MASTER_KEY);
    let key_path = config.data_dir.join("master.key");
    let old = match &from_env {
        Some(value) => {
            MasterKey::from_base64(value).map_err(|e| anyhow!("{}: {e}", config::ENV_MASTER_KEY))?
        }
        None => read_key(&key_path)
            .context("the current master key (LEASH_MASTER_KEY or DATA_DIR/master.key)")?,
    };
    if new.to_base64() == old.to_base64() {
        bail!("the new key is the current key");
    }
    // On SQLite this takes the database's lock: a running server makes it fail here, before
    // anything changed.
    let store = leash_store::open(&config.database).await.map_err(|e| {
        let url = leash_store::display_url(&config.database);
        anyhow!("cannot open database {url}: {e} (while a server runs, use --online)")
    })?;
    ensure_named(store.as_ref(), &old).await?;
    // Staged before the database changes, installed after: whichever way a crash falls, the
    // next start finds the key that opens the store (`master::settle`).
    let staged = config.data_dir.join(NEXT_MASTER_KEY_FILE);
    if from_env.is_none() {
        write_private(&staged, new.to_base64().as_bytes(), IfExists::Replace)?;
    }
    let now = leash_core::Clock::now(&leash_core::SystemClock);
    let mut event = AuditEvent::new("master_key.rotated", Mode::System, now);
    event.actor = Some("cli".into());
    event.reason = Some(format!("{} replaced by {} (offline)", old.id(), new.id()));
    let resealed = match rotate(store.as_ref(), &old, &old.id(), &new, Some(&event)).await {
        Ok(n) => n,
        Err(e) => {
            if from_env.is_none() {
                let _ = std::fs::remove_file(&staged);
            }
            return Err(e.context("master key not rotated"));
        }
    };
    drop(store);
    if from_env.is_none() {
        std::fs::rename(&staged, &key_path)
            .with_context(|| format!("cannot install the new key as {}", key_path.display()))?;
        println!(
            "re-sealed {resealed} values under the new master key; {} now holds it",
            key_path.display()
        );
    } else {
        println!(
            "re-sealed {resealed} values under the new master key; set {} to it before starting the server",
            config::ENV_MASTER_KEY
        );
    }
    Ok(())
}
