//! A SQLite database has one server: a second `leash serve` on the same data refuses to start
//! and says why, and the first goes on. `leash audit verify --database` only reads, so it can
//! check a live server's chain without becoming a second appender.

use std::time::Duration;

use leash_testkit::{ADMIN_KEY, Leash, Scenario};
use reqwest::Method;
use serde_json::json;

use super::bin;
use super::gateway::{grant, setup};

/// `leash serve` on `leash`'s config, data and database, as a second server would be started
/// by mistake; returns its exit status and everything it printed, or fails if it keeps running.
async fn second_server(leash: &Leash) -> (std::process::ExitStatus, String) {
    let child = tokio::process::Command::new(bin())
        .arg("serve")
        .arg("--config")
        .arg(leash.config_dir().join("leash.toml"))
        .arg("--data-dir")
        .arg(leash.data_dir())
        .arg("--database")
        .arg(leash.database_url())
        .args(["--listen", "127.0.0.1:0"])
        .env("LEASH_ADMIN_TOKEN", ADMIN_KEY)
        .env("LEASH_LOG", "warn")
        .env_remove("LEASH_MASTER_KEY")
        .env_remove("LEASH_DATABASE")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("the second server kept running on the first one's database")
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, printed)
}

/// SQLite only (a second node is what PostgreSQL is for), whichever backend the run is on.
#[tokio::test]
async fn a_second_server_on_the_same_sqlite_database_refuses_to_start_and_the_first_serves() {
    let upstream = leash_testkit::fixed_upstream(br#"{"ok":true}"#);
    let mut leash = Leash::start_quiet_on(bin(), "", &upstream, false).await;
    let s = Scenario::new(&leash).await;

    let (status, printed) = second_server(&leash).await;
    assert_eq!(status.code(), Some(1), "{printed}");
    let database = leash.data_dir().join("leash.db");
    let database = database.display();
    let expected = format!(
        "leash: cannot open database sqlite://{database}: database {database} is in use by \
         another Leash server (lock file {database}.lock); stop it first, or use PostgreSQL for \
         several nodes"
    );
    assert_eq!(
        printed.trim_end(),
        expected,
        "one line says what is wrong and what to do"
    );
    assert!(!printed.contains("panicked"), "{printed}");

    // The first server was not disturbed: it answers, and its writer still commits (a token
    // exchange consumes its assertion's and proof's one-time values).
    let (status, body) = leash.call(Method::GET, "/v1/users", ADMIN_KEY, None).await;
    assert_eq!(status, 200, "{body}");
    s.token(&leash).await;

    // Killed with SIGKILL, it leaves no lock behind: the kernel released it.
    leash.restart().await;
    let (status, body) = leash.call(Method::GET, "/v1/users", ADMIN_KEY, None).await;
    assert_eq!(status, 200, "{body}");
}

/// The number of events in the chain and the last one's hash, through the admin API.
async fn chain_head(leash: &Leash) -> (usize, String) {
    let (status, events) = super::audit::audit(leash, ADMIN_KEY, "?limit=10000").await;
    assert_eq!(status, 200, "{events:?}");
    let last = events.last().expect("events")["hash"]
        .as_str()
        .expect("hash")
        .to_owned();
    (events.len(), last)
}

/// On both backends: verifying a live server's database reads it and nothing else.
#[tokio::test]
async fn audit_verify_against_a_live_server_leaves_its_chain_untouched() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(status, 200, "{body}");
    let before = chain_head(&gw.leash).await;

    let data = gw.leash.data_dir();
    let out = std::process::Command::new(bin())
        .args(["audit", "verify", "--database", &gw.leash.database_url()])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("LEASH_MASTER_KEY")
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("audit chain verified: {} events", before.0)),
        "{printed}"
    );
    assert_eq!(
        chain_head(&gw.leash).await,
        before,
        "verify changed the chain"
    );

    // The server goes on appending to the same chain.
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/2", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(chain_head(&gw.leash).await.0, before.0 + 1);
}
