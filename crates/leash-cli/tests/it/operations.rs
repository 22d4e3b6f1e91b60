//! Operations on a stopped server (API §3): `leash master-key rotate` re-seals the store under a
//! new key in one transaction; a crash midway leaves a store that opens with one of the two
//! keys and loses nothing; the old key then opens nothing.

use leash_core::aead::MasterKey;
use reqwest::Method;
use serde_json::json;

use super::bin;
use super::gateway::{Gw, grant, setup};

/// `leash master-key rotate` on the stopped server's store, ready to run.
fn rotate_command(gw: &Gw, new_key_file: &std::path::Path) -> std::process::Command {
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
    command
}

/// Runs `command`: whether it succeeded, and what it printed.
fn outcome(command: &mut std::process::Command) -> (bool, String) {
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `leash master-key rotate` on the stopped server's store; its output and success.
fn rotate(gw: &Gw, new_key_file: &std::path::Path) -> (bool, String) {
    outcome(&mut rotate_command(gw, new_key_file))
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
    // Private, as `leash master-key rotate` demands.
    #[cfg(unix)]
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
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
    assert!(text.contains("does not open"), "{text}");
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
        staged.exists(),
        "a key the store is not sealed under yet stays staged, for an online rotation"
    );
    std::fs::remove_file(&staged).unwrap();
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
        let mut child = rotate_command(&gw, &path)
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

/// `leash master-key rotate --online` through the running server, staging the key in
/// `stage_in` first if given; its output and success.
fn rotate_online(
    gw: &Gw,
    new_key_file: &std::path::Path,
    stage_in: Option<&std::path::Path>,
) -> (bool, String) {
    let mut command = std::process::Command::new(bin());
    command
        .args(["master-key", "rotate", "--online", "--new-key-file"])
        .arg(new_key_file)
        .env("LEASH_URL", &gw.leash.url)
        .env("LEASH_TOKEN", leash_testkit::ADMIN_KEY);
    if let Some(dir) = stage_in {
        command.arg("--data-dir").arg(dir);
    }
    outcome(&mut command)
}

/// The sealed bytes of the human's vault entry for `mail`, read from outside the server.
async fn vault_sealed(gw: &Gw) -> Vec<u8> {
    gw.leash
        .query_bytes("SELECT sealed FROM vault WHERE upstream = 'mail'")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_rotation_reseals_while_serving_and_a_late_old_key_value_is_swept() {
    let mut gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    works(&gw).await;
    let keys = tempfile::tempdir().unwrap();
    let data = gw.leash.data_dir();
    let (key_file, staged) = (data.join("master.key"), data.join("master.key.next"));
    let old = std::fs::read_to_string(&key_file).unwrap();
    let (path, new) = new_key(keys.path(), "new.key");
    let (ok, new_id) = outcome(
        std::process::Command::new(bin())
            .args(["master-key", "id", "--key-file"])
            .arg(&path),
    );
    assert!(ok, "{new_id}");
    let new_id = new_id.trim().to_owned();
    // What a slow node would still write after the switch: a value under the old key.
    let under_old_key = vault_sealed(&gw).await;

    // Refused, and nothing changes: no key staged on the node; a staged key others can read;
    // a staged key other than the one asked for; a caller who is not the admin.
    let (ok, text) = rotate_online(&gw, &path, None);
    assert!(!ok, "{text}");
    assert!(text.contains("master.key.next"), "{text}");
    std::fs::write(&staged, &new).unwrap();
    #[cfg(unix)]
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (ok, text) = rotate_online(&gw, &path, None);
    assert!(!ok && text.contains("chmod 600"), "{text}");
    let (other, _) = new_key(keys.path(), "other.key");
    std::fs::copy(&other, &staged).unwrap();
    let (ok, text) = rotate_online(&gw, &path, None);
    assert!(!ok && text.contains("staged on this node"), "{text}");
    std::fs::remove_file(&staged).unwrap();
    let (status, body) = gw
        .leash
        .call(
            Method::POST,
            "/v1/master-key/rotate",
            &gw.s.user_key,
            Some(json!({ "new_key_id": new_id })),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), old);
    works(&gw).await;

    // Staged and rotated by one command, while serving: no restart, nothing refused.
    let (ok, text) = rotate_online(&gw, &path, Some(&data));
    assert!(ok, "{text}");
    // The answer printed first, then what the command says on stderr.
    let answer: serde_json::Value = serde_json::Deserializer::from_str(&text)
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(answer["key_id"], new_id.as_str(), "{text}");
    assert!(answer["resealed"].as_u64().unwrap() >= 4, "{text}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), new);
    assert!(!staged.exists());
    works(&gw).await;
    let (status, _) = gw.leash.call(Method::GET, "/readyz", "", None).await;
    assert_eq!(status, 200);
    let (status, body) = gw
        .leash
        .call(
            Method::PUT,
            "/v1/vault/mail",
            &gw.s.user_key,
            Some(json!({"kind": "cookie", "secret": "session=alice-mail-secret"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, events) = super::audit::audit(&gw.leash, leash_testkit::ADMIN_KEY, "").await;
    assert!(
        events.iter().any(|e| e["kind"] == "master_key.rotated"
            && e["reason"].as_str().unwrap_or_default().contains(&new_id)),
        "the rotation is audited"
    );
    // A second rotation to the same key is refused.
    let (ok, text) = rotate_online(&gw, &path, Some(&data));
    assert!(!ok && text.contains("current key"), "{text}");
    std::fs::remove_file(&staged).unwrap();

    // A node that had not switched yet writes under the old key: the node that still holds
    // the old key in memory re-seals it soon after, so a start with only the new key opens it.
    gw.leash
        .sql(
            &format!(
                "UPDATE vault SET sealed = X'{}' WHERE upstream = 'mail'",
                hex(&under_old_key)
            ),
            &format!(
                "UPDATE vault SET sealed = '\\x{}' WHERE upstream = 'mail'",
                hex(&under_old_key)
            ),
        )
        .await;
    works(&gw).await;
    let asked = std::time::Instant::now();
    while vault_sealed(&gw).await == under_old_key {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(15),
            "a value under the old key was never re-sealed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    gw.leash.kill9().await;
    gw.leash.start_again().await;
    works(&gw).await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `kid` in a JWT's header.
fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

async fn jwks_kids(leash: &leash_testkit::Leash) -> Vec<String> {
    let response = leash
        .http()
        .get(format!("{}/.well-known/jwks.json", leash.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["cache-control"],
        "public, max-age=2",
        "the JWKS says how long it may be cached"
    );
    let jwks: serde_json::Value = response.json().await.unwrap();
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// The agent's read with `token` (and its proof key): the gateway's status.
async fn read_with(gw: &Gw, token: &str, dpop: &leash_core::client::AgentKey) -> u16 {
    let url = format!("{}/gw/mail/messages/1", gw.leash.url);
    let proof = dpop.dpop_proof("GET", &url, Some(token), None, leash_testkit::now());
    let response = gw
        .leash
        .http()
        .get(&url)
        .header("Authorization", format!("DPoP {token}"))
        .header("DPoP", proof)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

async fn rotate_key(gw: &Gw, compromised: bool) -> serde_json::Value {
    let (status, body) = gw
        .leash
        .call(
            Method::POST,
            "/v1/keys/rotate",
            leash_testkit::ADMIN_KEY,
            Some(json!({ "compromised": compromised })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn cli(gw: &Gw, args: &[&str]) -> (bool, String) {
    cli_as(gw, Some(leash_testkit::ADMIN_KEY), args)
}

fn cli_as(gw: &Gw, token: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new(bin());
    command
        .args(args)
        .env("LEASH_URL", &gw.leash.url)
        .env_remove("LEASH_TOKEN")
        .env_remove("LEASH_MASTER_KEY");
    if let Some(token) = token {
        command.env("LEASH_TOKEN", token);
    }
    outcome(&mut command)
}

#[tokio::test]
async fn signing_keys_rotate_with_old_tokens_honoured_and_the_chain_verifying_across_rotations() {
    let gw = setup(
        "jwks_max_age = 2\nmax_token_ttl = 60\n",
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    let first = kid_of(&gw.token);
    assert_eq!(jwks_kids(&gw.leash).await, std::slice::from_ref(&first));
    // The admin alone rotates.
    let (status, _) = gw
        .leash
        .call(Method::POST, "/v1/keys/rotate", &gw.s.user_key, None)
        .await;
    assert_eq!(status, 403);

    let rotated = rotate_key(&gw, false).await;
    let second = rotated["kid"].as_str().unwrap().to_owned();
    assert_eq!(rotated["previous_kid"], first.as_str());
    // Published at once, next to the old key; not signing yet.
    assert_eq!(jwks_kids(&gw.leash).await, [first.clone(), second.clone()]);
    let (early, _) = gw.s.token(&gw.leash).await;
    assert_eq!(kid_of(&early), first);
    // From jwks_max_age on, the new key signs; tokens of the old one still work.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let (late, late_dpop) = gw.s.token(&gw.leash).await;
    assert_eq!(kid_of(&late), second);
    assert_eq!(read_with(&gw, &gw.token, &gw.dpop).await, 200);
    assert_eq!(read_with(&gw, &late, &late_dpop).await, 200);
    let (status, checkpoint) = gw
        .leash
        .call(
            Method::POST,
            "/v1/audit/checkpoints",
            leash_testkit::ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(status, 200, "{checkpoint}");
    assert_eq!(checkpoint["kid"], second.as_str());

    // Compromised: the next key signs at once, the compromised one is withdrawn at once.
    let rotated = rotate_key(&gw, true).await;
    let third = rotated["kid"].as_str().unwrap().to_owned();
    assert_eq!(
        read_with(&gw, &late, &late_dpop).await,
        401,
        "its tokens die"
    );
    let kids = jwks_kids(&gw.leash).await;
    assert!(kids.contains(&third) && !kids.contains(&second), "{kids:?}");
    let (now_token, _) = gw.s.token(&gw.leash).await;
    assert_eq!(kid_of(&now_token), third);
    rotate_key(&gw, false).await;

    // Three rotations: the chain verifies, from the database (every key kept) and from an
    // export (which carries the withdrawn key's public half).
    let url = gw.leash.database_url();
    let (ok, text) = cli(&gw, &["audit", "verify", "--database", &url]);
    assert!(ok, "{text}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let (ok, text) = cli(
        &gw,
        &["audit", "export", "--output", file.to_str().unwrap()],
    );
    assert!(ok, "{text}");
    // With the admin key, the server's whole key list verifies it.
    let (ok, text) = cli(&gw, &["audit", "verify", file.to_str().unwrap()]);
    assert!(ok, "{text}");
    // With the published JWKS alone, the withdrawn key is missing: refused, unless the key the
    // export carries is trusted, and then it is named.
    let file = file.to_str().unwrap();
    let (ok, text) = cli_as(&gw, None, &["audit", "verify", file]);
    assert!(!ok, "{text}");
    let (ok, text) = cli_as(&gw, None, &["audit", "verify", file, "--trust-export-keys"]);
    assert!(ok, "{text}");
    assert!(text.contains(&second), "the withdrawn key is named: {text}");
    let (ok, text) = cli(&gw, &["keys", "list"]);
    assert!(
        ok && text.contains(&first) && text.contains(&second),
        "{text}"
    );
}

#[tokio::test]
async fn two_rotations_at_once_make_one_new_key() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    let rotations = (0..6).map(|_| {
        gw.leash.call(
            Method::POST,
            "/v1/keys/rotate",
            leash_testkit::ADMIN_KEY,
            None,
        )
    });
    let statuses: Vec<u16> = futures::future::join_all(rotations)
        .await
        .into_iter()
        .map(|(status, _)| status)
        .collect();
    let made = statuses.iter().filter(|&&s| s == 200).count();
    assert!(made >= 1, "{statuses:?}");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 409),
        "{statuses:?}"
    );
    let (_, keys) = gw
        .leash
        .call(Method::GET, "/v1/keys", leash_testkit::ADMIN_KEY, None)
        .await;
    // Each success ended the key before it: a chain, never two keys published without an end.
    let open = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k.get("published_until").is_none())
        .count();
    assert_eq!(open, 1, "{keys}");
    assert_eq!(keys["keys"].as_array().unwrap().len(), made + 1);
}

#[tokio::test]
async fn a_scheduled_rotation_happens_once_the_newest_key_is_old_enough() {
    let gw = setup(
        "jwks_max_age = 1\n[keys]\nrotate_every = \"2s\"\n",
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, keys) = gw
            .leash
            .call(Method::GET, "/v1/keys", leash_testkit::ADMIN_KEY, None)
            .await;
        if keys["keys"].as_array().unwrap().len() >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled rotation: {keys}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The token from before still works; a new one is signed by the scheduled key once due.
    assert_eq!(read_with(&gw, &gw.token, &gw.dpop).await, 200);
}

/// A `leash serve` on `data_dir` with `config`, started by hand: its base URL and process.
async fn serve_on(
    config: &std::path::Path,
    data_dir: &std::path::Path,
    database: Option<&str>,
) -> (String, tokio::process::Child) {
    use tokio::io::AsyncBufReadExt as _;
    let mut command = tokio::process::Command::new(bin());
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .env("LEASH_ADMIN_TOKEN", leash_testkit::ADMIN_KEY)
        .env("LEASH_LOG", "warn")
        .env_remove("LEASH_MASTER_KEY")
        .env_remove("LEASH_DATABASE")
        .env_remove("LEASH_ISSUER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    if let Some(database) = database {
        command.arg("--database").arg(database);
    }
    let mut child = command.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(rest) = line.strip_prefix("leash listening on ") {
            let addr = rest.split(' ').next().unwrap().to_owned();
            return (format!("http://{addr}"), child);
        }
    }
    panic!("the restored server did not start");
}

async fn admin_get(url: &str, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(leash_testkit::ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_to_a_verifying_store_where_nothing_live_comes_back() {
    let gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    if gw.leash.on_postgres() {
        // PostgreSQL is backed up with pg_dump: the server says so.
        let (status, body) = gw
            .leash
            .call(Method::GET, "/v1/backup", leash_testkit::ADMIN_KEY, None)
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request"))
        );
        return;
    }
    let (status, _) = gw
        .leash
        .call(Method::GET, "/v1/backup", &gw.s.user_key, None)
        .await;
    assert_eq!(status, 403, "the admin alone takes backups");
    // Traffic while the backup is taken.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = {
        let (stop, served) = (stop.clone(), served.clone());
        let (token, target) = (
            gw.token.clone(),
            format!("{}/gw/mail/messages/1", gw.leash.url),
        );
        // Signed ahead: the proof key stays with the test.
        let proofs: Vec<String> = (0..2_000)
            .map(|_| {
                gw.dpop
                    .dpop_proof("GET", &target, Some(&token), None, leash_testkit::now())
            })
            .collect();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for proof in proofs {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let answer = http
                    .get(&target)
                    .header("Authorization", format!("DPoP {token}"))
                    .header("DPoP", proof)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200);
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("leash-backup.db");
    let (ok, text) = cli(&gw, &["backup", "--out", file.to_str().unwrap()]);
    assert!(ok, "{text}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    assert!(served.load(std::sync::atomic::Ordering::Relaxed) > 5);
    // The backup holds the proofs used so far (they stay refused after a restore).
    let used: i64 = rusqlite::Connection::open(&file)
        .unwrap()
        .query_row("SELECT count(*) FROM replay", [], |row| row.get(0))
        .unwrap();
    assert!(used >= 5, "{used} used proofs in the backup");
    // The backup is a database whose chain verifies, with no master key.
    let backup_url = format!("sqlite://{}", file.display());
    let (ok, text) = cli(&gw, &["audit", "verify", "--database", &backup_url]);
    assert!(ok, "{text}");

    // Restored into an empty data dir, with the server's master key.
    let restored = dir.path().join("restored");
    let master = gw.leash.data_dir().join("master.key");
    let (ok, text) = cli(
        &gw,
        &[
            "restore",
            "--from",
            file.to_str().unwrap(),
            "--data-dir",
            restored.to_str().unwrap(),
            "--master-key-file",
            master.to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    // Never over a store that exists.
    let (ok, text) = cli(
        &gw,
        &[
            "restore",
            "--from",
            file.to_str().unwrap(),
            "--data-dir",
            restored.to_str().unwrap(),
        ],
    );
    assert!(!ok && text.contains("exists"), "{text}");

    let config = gw.leash.config_dir().join("leash.toml");
    let (url, mut child) = serve_on(&config, &restored, None).await;
    // The grant live in the snapshot is revoked, its token refused (ATTACKS 61).
    let grant = admin_get(&url, &format!("/v1/grants/{}", gw.s.grant_id())).await;
    assert_eq!(grant["status"], "revoked", "{grant}");
    let target = format!("{url}/gw/mail/messages/1");
    let proof = gw
        .dpop
        .dpop_proof("GET", &target, Some(&gw.token), None, leash_testkit::now());
    let refused = reqwest::Client::new()
        .get(&target)
        .header("Authorization", format!("DPoP {}", gw.token))
        .header("DPoP", proof)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // A new signing key; every key before it withdrawn.
    let keys = admin_get(&url, "/v1/keys").await;
    let keys = keys["keys"].as_array().unwrap();
    assert!(keys.len() >= 2);
    assert!(
        keys[..keys.len() - 1]
            .iter()
            .all(|k| k.get("published_until").is_some())
    );
    // The first event after the snapshot's is system.restore, naming its last seq and hash;
    // the chain verifies across the restore.
    let audit = reqwest::Client::new()
        .get(format!("{url}/v1/audit"))
        .bearer_auth(leash_testkit::ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at = events
        .iter()
        .position(|e| e["kind"] == "system.restore")
        .expect("system.restore");
    let before = &events[at - 1];
    let reason = events[at]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("seq {}", before["seq"]))
            && reason.contains(before["hash"].as_str().unwrap()),
        "{reason}"
    );
    assert!(reason.contains("1 grants revoked"), "{reason}");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let restored_url = format!("sqlite://{}", restored.join("leash.db").display());
    let (ok, text) = cli(&gw, &["audit", "verify", "--database", &restored_url]);
    assert!(ok, "{text}");
}

#[tokio::test]
async fn a_database_marked_restored_is_rolled_back_at_its_next_start() {
    // The PostgreSQL procedure: pg_restore, then `leash restore --database URL` marks it.
    let mut gw = setup("", grant(&["mail:read", "mail:send"], &["mail"], json!({}))).await;
    // An approval waiting for the human when the backup was taken.
    let (status, _, asked) = gw.call(Method::POST, "/gw/mail/messages/1/send", &[]).await;
    assert_eq!(
        (status, asked["error"].as_str()),
        (403, Some("approval_required")),
        "{asked}"
    );
    let approval = asked["approval_id"].as_str().unwrap().to_owned();
    gw.leash.kill9().await;
    let (ok, text) = cli(
        &gw,
        &[
            "restore",
            "--database",
            &gw.leash.database_url(),
            "--data-dir",
            gw.leash.data_dir().to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    gw.leash.start_again().await;
    assert_eq!(read_with(&gw, &gw.token, &gw.dpop).await, 401);
    assert_eq!(gw.s.grant_status(&gw.leash).await, "revoked");
    let (_, approval) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/approvals/{approval}"),
            leash_testkit::ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(approval["status"], "expired", "{approval}");
    // Nor can the human approve it now.
    let (status, _) = gw
        .leash
        .call(
            Method::POST,
            &format!("/v1/approvals/{}/approve", approval["id"].as_str().unwrap()),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_ne!(status, 200);
    // Once: a second start does nothing more.
    let (_, keys) = gw
        .leash
        .call(Method::GET, "/v1/keys", leash_testkit::ADMIN_KEY, None)
        .await;
    let count = keys["keys"].as_array().unwrap().len();
    gw.leash.restart().await;
    let (_, keys) = gw
        .leash
        .call(Method::GET, "/v1/keys", leash_testkit::ADMIN_KEY, None)
        .await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), count);
}

#[tokio::test]
async fn the_postgres_procedure_pg_dump_pg_restore_and_the_mark_rolls_back_too() {
    let mut gw = setup("", grant(&["mail:read"], &["mail"], json!({}))).await;
    if !gw.leash.on_postgres() {
        return; // The SQLite procedure is `leash backup`, tested above.
    }
    let url = gw.leash.database_url();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("leash.dump");
    let status = std::process::Command::new("pg_dump")
        .args(["-Fc", "-f"])
        .arg(&dump)
        .arg(&url)
        .status()
        .expect("pg_dump (installed with PostgreSQL by .ci/postgres.sh)");
    assert!(status.success());
    // After the dump: the grant is revoked on the live deployment.
    gw.revoke().await;
    gw.leash.kill9().await;
    let status = std::process::Command::new("pg_restore")
        .args(["--clean", "--if-exists", "--no-owner", "-d"])
        .arg(&url)
        .arg(&dump)
        .status()
        .unwrap();
    assert!(status.success());
    let (ok, text) = cli(&gw, &["restore", "--database", &url]);
    assert!(ok, "{text}");
    gw.leash.start_again().await;
    // Active in the dump, revoked by the rollback: never usable again.
    assert_eq!(read_with(&gw, &gw.token, &gw.dpop).await, 401);
    let (_, grant) = gw
        .leash
        .call(
            Method::GET,
            &format!("/v1/grants/{}", gw.s.grant_id()),
            leash_testkit::ADMIN_KEY,
            None,
        )
        .await;
    assert_eq!(grant["status"], "revoked", "{grant}");
    let (ok, text) = cli(&gw, &["audit", "verify", "--database", &url]);
    assert!(ok, "{text}");
}
