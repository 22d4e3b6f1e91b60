//! Operations on a stopped server (API §3): `leash master-key rotate` re-seals the store under a
//! new key in one transaction; a crash midway leaves a store that opens with one of the two
//! keys and loses nothing; the old key then opens nothing.

use leash_core::aead::MasterKey;
use reqwest::Method;
use serde_json::json;

use super::bin;
use super::gateway::{Gw, grant, setup};

/// `leash master-key rotate` on the stopped server's store; its output and success.
fn rotate(gw: &Gw, new_key_file: &std::path::Path) -> (bool, String) {
    let mut command = std::process::Command::new(bin());
    command
        .args(["master-key", "rotate", "--new-key-file"])
        .arg(new_key_file)
        .arg("--data-dir")
        .arg(gw.leash.data_dir())
        .arg("--database")
        .arg(gw.leash.database_url())
        .env_remove("LEASH_MASTER_KEY")
        .env_remove("LEASH_CONFIG")
        .env_remove("LEASH_DATABASE");
    if let Some(key) = gw.leash.master_key() {
        command.env("LEASH_MASTER_KEY", key);
    }
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The agent's read goes through with the human's vaulted cookie (the store opened with the
/// key the server started with: its signing key verified the token, the vault entry opened).
async fn works(gw: &Gw) {
    let before = gw.upstream.count();
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(status, 200, "{body}");
    let seen = &gw.upstream.requests()[before];
    assert_eq!(seen.headers["cookie"], "session=alice-mail-secret");
}

fn new_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let key = MasterKey::generate().to_base64().to_string();
    let path = dir.join(name);
    std::fs::write(&path, format!("{key}\n")).unwrap();
    (path, key)
}

#[tokio::test]
async fn master_key_rotation_reseals_everything_and_the_old_key_opens_nothing() {
    let mut gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    works(&gw).await;
    let keys = tempfile::tempdir().unwrap();
    let key_file = gw.leash.data_dir().join("master.key");
    let old = std::fs::read_to_string(&key_file).unwrap();

    if !gw.leash.on_postgres() {
        // While the server runs, SQLite's lock refuses the rotation, and nothing changes.
        let (path, _) = new_key(keys.path(), "early.key");
        let (ok, text) = rotate(&gw, &path);
        assert!(!ok, "{text}");
        assert!(text.contains("in use"), "{text}");
        assert_eq!(std::fs::read_to_string(&key_file).unwrap(), old);
    }

    gw.leash.kill9().await;
    let (path, new) = new_key(keys.path(), "new.key");
    let (ok, text) = rotate(&gw, &path);
    assert!(ok, "{text}");
    assert!(text.contains("re-sealed"), "{text}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), new);
    assert!(!gw.leash.data_dir().join("master.key.next").exists());
    gw.leash.start_again().await;
    // The token issued before still verifies, the vaulted cookie still opens.
    works(&gw).await;

    // The old key opens nothing now: a server given it refuses to start, saying why.
    gw.leash.kill9().await;
    std::fs::write(&key_file, &old).unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(gw.leash.data_dir())
        .arg("--database")
        .arg(gw.leash.database_url())
        .env_remove("LEASH_MASTER_KEY")
        .env_remove("LEASH_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("master key does not open"), "{stderr}");
    // Rotating from a key that opens nothing changes nothing either.
    let (path, _) = new_key(keys.path(), "other.key");
    let (ok, text) = rotate(&gw, &path);
    assert!(!ok, "{text}");
    assert!(text.contains("nothing was changed"), "{text}");
    std::fs::write(&key_file, format!("{new}\n")).unwrap();
    gw.leash.start_again().await;
    works(&gw).await;
}

#[tokio::test]
async fn a_start_after_a_crash_on_either_side_of_the_commit_finds_the_right_key() {
    let mut gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let keys = tempfile::tempdir().unwrap();
    let data = gw.leash.data_dir();
    let (key_file, staged) = (data.join("master.key"), data.join("master.key.next"));
    // Before the commit: the new key staged, the store still under the old one.
    gw.leash.kill9().await;
    let (path, _) = new_key(keys.path(), "unused.key");
    std::fs::copy(&path, &staged).unwrap();
    gw.leash.start_again().await;
    works(&gw).await;
    assert!(
        !staged.exists(),
        "the staged key that opens nothing is removed"
    );
    // After the commit, before the new key was installed.
    gw.leash.kill9().await;
    let old = std::fs::read_to_string(&key_file).unwrap();
    let (path, new) = new_key(keys.path(), "new.key");
    let (ok, text) = rotate(&gw, &path);
    assert!(ok, "{text}");
    std::fs::rename(&key_file, &staged).unwrap();
    std::fs::write(&key_file, &old).unwrap();
    gw.leash.start_again().await;
    works(&gw).await;
    assert!(!staged.exists());
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), new);
}

#[tokio::test]
async fn a_rotation_killed_midway_leaves_a_store_that_opens_and_loses_nothing() {
    let mut gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    // More sealed values, so that the rotation takes long enough to be cut somewhere.
    for i in 0..200 {
        let (_, user_key) = gw.leash.create_user(&format!("bulk{i}")).await;
        let (status, body) = gw
            .leash
            .call(
                Method::PUT,
                "/v1/vault/mail",
                &user_key,
                Some(json!({"kind": "bearer", "secret": format!("token-{i}")})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let keys = tempfile::tempdir().unwrap();
    for (round, delay_ms) in [1_u64, 15, 40, 120].into_iter().enumerate() {
        gw.leash.kill9().await;
        let (path, _) = new_key(keys.path(), &format!("k{round}.key"));
        let mut child = std::process::Command::new(bin())
            .args(["master-key", "rotate", "--new-key-file"])
            .arg(&path)
            .arg("--data-dir")
            .arg(gw.leash.data_dir())
            .arg("--database")
            .arg(gw.leash.database_url())
            .env_remove("LEASH_MASTER_KEY")
            .env_remove("LEASH_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        let _ = child.kill();
        child.wait().unwrap();
        // Whichever way the cut fell, the server starts with the key that opens the store.
        gw.leash.start_again().await;
        works(&gw).await;
    }
}
