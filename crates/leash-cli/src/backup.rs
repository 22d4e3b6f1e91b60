//! `leash backup` (from a running server) and `leash restore` (into an empty data dir, or to
//! mark a PostgreSQL database restored with pg_restore), API §3.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use leash_server::config::{Config, Flags};
use leash_server::files::{IfExists, write_private};

use crate::Remote;
use crate::client::{base, bearer, http, json_or_error};

/// `leash backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Where to write the backup (a SQLite database file; written whole, then renamed).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    remote: Remote,
}

/// Downloads a consistent copy of a running server's store (admin key).
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let url = format!("{}/v1/backup", base(&args.remote));
    let mut response = http()?
        .get(&url)
        .bearer_auth(bearer(&args.remote)?)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    if !response.status().is_success() {
        json_or_error(response).await?;
        bail!("the server refused the backup");
    }
    let partial = args.out.with_extension("partial");
    // A whole copy of the store: private, like the master key.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let expected = response.content_length();
    let progress = indicatif::ProgressBar::new(expected.unwrap_or(0));
    progress.set_style(
        indicatif::ProgressStyle::with_template("backing up {bar:40} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut written = 0_u64;
    while let Some(chunk) = response.chunk().await.context("the backup was cut off")? {
        file.write_all(&chunk)?;
        written += chunk.len() as u64;
        progress.set_position(written);
    }
    file.sync_all()?;
    drop(file);
    progress.finish_and_clear();
    if expected.is_some_and(|n| n != written) {
        let _ = std::fs::remove_file(&partial);
        bail!("the backup was cut off after {written} bytes");
    }
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "backup of {written} bytes written to {}",
        args.out.display()
    );
    Ok(())
}

/// `leash restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// A backup made by `leash backup`, put back as the data dir's database, which must not
    /// exist yet. Without it (PostgreSQL, after pg_restore): only mark `--database` restored.
    #[arg(long)]
    from: Option<PathBuf>,
    /// The master key the backed-up server used (its master.key), copied into the data dir;
    /// or set LEASH_MASTER_KEY when starting.
    #[arg(long)]
    master_key_file: Option<PathBuf>,
    /// Config file (TOML); also LEASH_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Database URL [default: sqlite://<data dir>/leash.db]; also LEASH_DATABASE.
    #[arg(long)]
    database: Option<String>,
    /// Data directory [default: ./.leash]; also LEASH_DATA_DIR.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Puts a backup back and marks the store restored: its next start revokes every grant still
/// active, expires pending approvals, ends sessions, replaces the signing key and records
/// `system.restore` (a restore is a rollback).
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let flags = Flags {
        config: args.config,
        database: args.database,
        data_dir: args.data_dir,
        ..Flags::default()
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let config = Config::load(&flags, env)?;
    // The database this run put in place, taken out again if marking it fails.
    let mut installed: Option<std::path::PathBuf> = None;
    if let Some(from) = &args.from {
        let path = config
            .database
            .strip_prefix("sqlite://")
            .ok_or_else(|| {
                anyhow!("--from restores a SQLite store; restore PostgreSQL with pg_restore, then run `leash restore --database URL` to mark it")
            })?;
        let path = std::path::Path::new(path);
        if path.exists() {
            bail!(
                "{} exists: restore into an empty data dir (a restore never overwrites a store)",
                path.display()
            );
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let partial = path.with_extension("restoring");
        let checked = async {
            std::fs::copy(from, &partial)
                .with_context(|| format!("cannot copy {}", from.display()))?;
            #[cfg(unix)]
            std::fs::set_permissions(
                &partial,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            std::fs::File::open(&partial)?.sync_all()?;
            // Only a Leash store is put in place: a wrong file leaves nothing behind.
            let url = format!("sqlite://{}", partial.display());
            leash_store::open_audit_reader(&url)
                .await
                .map_err(|e| anyhow!("{} is not a Leash backup: {e}", from.display()))?;
            Ok::<_, anyhow::Error>(())
        };
        if let Err(e) = checked.await {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, path)?;
        installed = Some(path.to_owned());
    }
    if let Some(key) = &args.master_key_file {
        let text = std::fs::read_to_string(key)
            .with_context(|| format!("cannot read {}", key.display()))?;
        leash_core::aead::MasterKey::from_base64(&text)
            .map_err(|e| anyhow!("{}: {e}", key.display()))?;
        std::fs::create_dir_all(&config.data_dir)?;
        write_private(
            &config.data_dir.join("master.key"),
            text.trim().as_bytes(),
            IfExists::Fail,
        )
        .context("the data dir has a master key already")?;
    }
    let marked = async {
        let store = leash_store::open(&config.database).await.map_err(|e| {
            let url = leash_store::display_url(&config.database);
            anyhow!("cannot open database {url}: {e}")
        })?;
        let mark = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
        store
            .init_setting(leash_store::RESTORE_PENDING, mark.as_bytes())
            .await?;
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = marked.await {
        if let Some(path) = installed {
            for leftover in ["", "-wal", "-shm", ".lock"] {
                let _ = std::fs::remove_file(format!("{}{leftover}", path.display()));
            }
        }
        return Err(e);
    }
    println!(
        "restored into {}; its first start revokes every grant still active, expires pending approvals, ends sessions and replaces the signing key",
        leash_store::display_url(&config.database)
    );
    // A rollback also undoes what was done to people and agents since the backup.
    eprintln!(
        "note: users and agents disabled after this backup was taken are enabled again in it; disable them again before agents get new grants (leash user list, leash agent list)"
    );
    Ok(())
}
