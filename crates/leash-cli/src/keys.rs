//! `leash master-key rotate`: re-seals a stopped server's store under a new master key (API §3).

use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use leash_core::aead::MasterKey;
use leash_server::bootstrap::{NEXT_MASTER_KEY_FILE, rotate_master_key};
use leash_server::config::{self, Config, Flags};
use leash_server::files::{IfExists, write_private};

/// `leash master-key …`.
#[derive(Debug, clap::Subcommand)]
pub enum MasterKeyCommand {
    /// Re-seal everything sealed (signing keys, vault, approval previews) under a new master
    /// key, in one transaction; a failure or a crash midway leaves the old key valid. The server
    /// must be stopped (all nodes, on PostgreSQL). With the key in DATA_DIR/master.key, that file
    /// is replaced; with LEASH_MASTER_KEY, set it to the new key before starting again.
    Rotate {
        /// The new key: base64 of 32 random bytes (e.g. `openssl rand -base64 32 > new.key`).
        #[arg(long)]
        new_key_file: PathBuf,
        /// Config file (TOML); also LEASH_CONFIG.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Database URL [default: sqlite://<data dir>/leash.db]; also LEASH_DATABASE.
        #[arg(long)]
        database: Option<String>,
        /// Data directory [default: ./.leash]; also LEASH_DATA_DIR.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn read_key(path: &std::path::Path) -> anyhow::Result<MasterKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the key file {}", path.display()))?;
    MasterKey::from_base64(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Runs `leash master-key …`.
pub async fn master_key(cmd: MasterKeyCommand) -> anyhow::Result<()> {
    let MasterKeyCommand::Rotate {
        new_key_file,
        config,
        database,
        data_dir,
    } = cmd;
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
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&new_key_file)
            .with_context(|| format!("cannot read the key file {}", new_key_file.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} can be read by others (mode {:o}): make it private first (chmod 600)",
                new_key_file.display(),
                mode & 0o777
            );
        }
    }
    let new = read_key(&new_key_file)?;
    if new.to_base64() == old.to_base64() {
        bail!("the new key is the current key");
    }
    // On SQLite this takes the database's lock: a running server makes it fail here, before
    // anything changed.
    let store = leash_store::open(&config.database).await.map_err(|e| {
        let url = leash_store::display_url(&config.database);
        anyhow!("cannot open database {url}: {e}")
    })?;
    // Staged before the database changes, installed after: whichever way a crash falls, the
    // next start finds the key that opens the store (`settle_master_key`).
    let staged = config.data_dir.join(NEXT_MASTER_KEY_FILE);
    if from_env.is_none() {
        write_private(&staged, new.to_base64().as_bytes(), IfExists::Replace)?;
    }
    let resealed = match rotate_master_key(store.as_ref(), &old, &new).await {
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
