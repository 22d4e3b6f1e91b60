//! First start and restarts of `leash serve` (API §12): the admin key is generated and shown
//! once, the master key guards the stored keys, and bad settings stop the process with one line.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

use super::bin;

fn serve(dir: &std::path::Path, envs: &[(&str, &str)]) -> Command {
    let mut command = Command::new(bin());
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env_remove("LEASH_ADMIN_TOKEN")
        .env_remove("LEASH_MASTER_KEY")
        .env_remove("LEASH_CONFIG")
        .env("LEASH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    command
}

/// Starts the server and returns its stdout lines up to the listening line, and the child.
#[expect(
    clippy::zombie_processes,
    reason = "the child is returned; every caller kills and waits for it"
)]
fn start(dir: &std::path::Path, envs: &[(&str, &str)]) -> (Vec<String>, String, Child) {
    let mut child = serve(dir, envs).spawn().unwrap();
    let mut lines = Vec::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "server exited early: {lines:?}"
        );
        let line = line.trim_end().to_owned();
        if let Some(rest) = line.strip_prefix("leash listening on ") {
            let addr = rest.split(' ').next().unwrap().to_owned();
            lines.push(line);
            return (lines, format!("http://{addr}"), child);
        }
        lines.push(line);
    }
}

#[tokio::test]
async fn generated_admin_key_is_shown_once_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let (lines, url, mut child) = start(dir.path(), &[]);
    let key = lines
        .iter()
        .find_map(|l| l.strip_prefix("admin API key (shown once, store it now): "))
        .expect("the first start prints the admin key")
        .to_owned();
    let client = reqwest::Client::new();
    let status = client
        .get(format!("{url}/v1/agents"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    child.kill().unwrap();
    child.wait().unwrap();

    let (lines, url, mut child) = start(dir.path(), &[]);
    assert!(
        lines.iter().all(|l| !l.contains("admin API key")),
        "shown only once: {lines:?}"
    );
    let status = client
        .get(format!("{url}/v1/agents"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "the key survives restarts");
    child.kill().unwrap();
    child.wait().unwrap();

    // The data dir's key files are private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("master.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn a_wrong_master_key_or_a_bad_database_stops_the_server_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, mut child) = start(
        dir.path(),
        &[(
            "LEASH_ADMIN_TOKEN",
            "lsk_x_admin_key_for_this_test_0123456789",
        )],
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let other = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    for (envs, extra, expected) in [
        (
            vec![("LEASH_MASTER_KEY", other)],
            vec![],
            "master key does not open",
        ),
        (
            vec![("LEASH_MASTER_KEY", "short")],
            vec![],
            "LEASH_MASTER_KEY",
        ),
        (
            vec![],
            vec!["--database", "sqlite:///nonexistent/dir/leash.db"],
            "cannot open database",
        ),
    ] {
        let out = serve(dir.path(), &envs).args(&extra).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expected) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
}
