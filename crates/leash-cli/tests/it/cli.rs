//! The CLI as a newcomer uses it: the README walkthrough end to end through the binary.

use std::process::Output;

use leash_testkit::{ADMIN_KEY, Leash};
use serde_json::Value;

use super::{bin, leash};

fn run(leash: &Leash, dir: &std::path::Path, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(bin());
    command
        .args(args)
        .current_dir(dir)
        .env("LEASH_URL", &leash.url)
        .env_remove("LEASH_TOKEN");
    if let Some(token) = token {
        command.env("LEASH_TOKEN", token);
    }
    command.output().expect("run leash")
}

fn ok_json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("json output")
}

#[tokio::test]
async fn walkthrough_keygen_register_grant_token_curl_complete() {
    let leash = leash().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = ok_json(&run(&leash, d, Some(ADMIN_KEY), &["user", "add", "alice"]));
    let alice_key = alice["api_key"].as_str().unwrap().to_owned();

    let out = run(&leash, d, None, &["agent", "keygen", "--out", "agent.jwk"]);
    assert!(out.status.success());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(d.join("agent.jwk"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
    let again = run(&leash, d, None, &["agent", "keygen", "--out", "agent.jwk"]);
    assert!(!again.status.success(), "keygen must not overwrite a key");

    let agent = ok_json(&run(
        &leash,
        d,
        Some(ADMIN_KEY),
        &[
            "agent",
            "register",
            "--id",
            "spiffe://example.org/agent/mailbot",
            "--key",
            "agent.jwk",
        ],
    ));
    assert!(
        agent["jwks"]["keys"][0].get("d").is_none(),
        "only the public key is sent"
    );

    let grant = ok_json(&run(
        &leash,
        d,
        Some(&alice_key),
        &[
            "grant",
            "create",
            "--agent",
            "spiffe://example.org/agent/mailbot",
            "--purpose",
            "Summarise my inbox",
            "--upstream",
            "mail",
            "--action",
            "mail:read",
            "--action",
            "mail:draft",
            "--ttl",
            "900",
        ],
    ));
    let handle = grant["handle"].as_str().unwrap();
    let grant_id = grant["id"].as_str().unwrap();

    let out = run(
        &leash,
        d,
        None,
        &[
            "agent",
            "token",
            "--id",
            "spiffe://example.org/agent/mailbot",
            "--key",
            "agent.jwk",
            "--handle",
            handle,
            "--scope",
            "mail:read",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("leash-session.json")).unwrap())
            .unwrap();
    assert_eq!(session["scope"], "mail:read");

    let listed = ok_json(&run(
        &leash,
        d,
        Some(&alice_key),
        &["grant", "list", "--status", "active"],
    ));
    assert_eq!(listed["grants"].as_array().unwrap().len(), 1);

    let url = format!("{}/v1/grants/{grant_id}/complete", leash.url);
    let out = run(&leash, d, None, &["agent", "curl", "POST", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["status"], "completed");

    // The old token is dead: the same call now fails with a one-line error and a non-zero exit.
    let out = run(&leash, d, None, &["agent", "curl", "POST", &url]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("invalid_token"), "{stdout}");
}

#[test]
fn every_verb_has_help() {
    for verb in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["user", "add", "--help"],
        vec!["agent", "keygen", "--help"],
        vec!["agent", "register", "--help"],
        vec!["agent", "token", "--help"],
        vec!["agent", "curl", "--help"],
        vec!["grant", "create", "--help"],
        vec!["grant", "list", "--help"],
        vec!["grant", "revoke", "--help"],
        vec!["grant", "complete", "--help"],
    ] {
        let out = std::process::Command::new(bin())
            .args(&verb)
            .output()
            .unwrap();
        assert!(out.status.success(), "{verb:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Usage:") && text.lines().count() > 3,
            "{verb:?}: {text}"
        );
    }
}

#[test]
fn clear_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config", "missing.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read config file") && err.trim().lines().count() == 1,
        "{err}"
    );

    std::fs::write(dir.path().join("bad.toml"), "listne = 1\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config", "bad.toml", "--check"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));

    let out = std::process::Command::new(bin())
        .args([
            "serve",
            "--database",
            "mysql://x",
            "--data-dir",
            "d",
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported database url"));

    let out = std::process::Command::new(bin())
        .args(["grant", "list"])
        .env_remove("LEASH_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LEASH_TOKEN"));
}

#[test]
fn policy_check_validates_example_and_refuses_broken_policies() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let config = format!("{root}/leash.toml");
    let out = std::process::Command::new(bin())
        .args([
            "policy",
            "check",
            &format!("{root}/policies"),
            "--config",
            &config,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 policies valid"));

    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        ("permit(principal", "unexpected end of input"),
        (
            "permit(principal, action, resource) when { context.nope };",
            "does not validate",
        ),
    ] {
        std::fs::write(dir.path().join("p.cedar"), text).unwrap();
        let out = std::process::Command::new(bin())
            .args([
                "policy",
                "check",
                dir.path().to_str().unwrap(),
                "--config",
                &config,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{err}");
        // serve refuses to start with it, with a one-line reason.
        let toml = dir.path().join("leash.toml");
        let example = std::fs::read_to_string(&config).unwrap();
        let policies = format!("policy_dir = \"{}\"", dir.path().display());
        std::fs::write(
            &toml,
            example.replace("policy_dir = \"policies\"", &policies),
        )
        .unwrap();
        let child = std::process::Command::new(bin())
            .args([
                "serve",
                "--config",
                toml.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .env("LEASH_ADMIN_TOKEN", "lsk_policy_test_admin_key_0123456789")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = exits_within(child, 20);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn example_configs_are_valid() {
    for example in ["leash.toml", "mcp/leash.toml", "console/leash.toml"] {
        let config = format!("{}/../../examples/{example}", env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(bin())
            .args(["serve", "--check", "--config", &config])
            .env("LEASH_OIDC_CLIENT_SECRET", "console-example-secret")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The OIDC client secret comes from the environment only, and its absence is named.
    let config = format!(
        "{}/../../examples/console/leash.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = std::process::Command::new(bin())
        .args(["serve", "--check", "--config", &config])
        .env_remove("LEASH_OIDC_CLIENT_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LEASH_OIDC_CLIENT_SECRET"), "{err}");
}

/// Waits for a child that must exit by itself; kills it and fails if it does not in time.
fn exits_within(mut child: std::process::Child, seconds: u64) -> std::process::Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the process did not exit within {seconds} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
