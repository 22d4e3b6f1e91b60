//! The access token checked by an independent JOSE library outside Rust (PyJWT), against the
//! published JWKS. The virtualenv is made under the target directory on first use.

use std::path::PathBuf;
use std::process::Command;

use leash_testkit::{AGENT, Scenario};
use reqwest::Method;
use serde_json::json;

use super::leash;

fn python_with_pyjwt() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jose-venv");
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", "import jwt, cryptography"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let base = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let made = Command::new(&base)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for this test");
        assert!(made.success(), "cannot create a virtualenv with {base}");
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "PyJWT[crypto]==2.10.1"])
            .status()
            .expect("pip");
        assert!(installed.success(), "cannot install PyJWT");
    }
    assert!(ready(), "PyJWT is not importable in {}", venv.display());
    python
}

#[tokio::test]
async fn token_verifies_with_pyjwt_against_the_published_jwks() {
    let leash = leash().await;
    let s = Scenario::new(&leash).await;
    let (token, dpop) = s.token(&leash).await;
    let (_, jwks) = leash
        .call(Method::GET, "/.well-known/jwks.json", "", None)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let expected = json!({
        "sub": s.user_id, "client_id": AGENT, "agent": AGENT, "grant_id": s.grant_id(),
        "jkt": dpop.public().thumbprint(),
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/jose_check.py");
    let python = tokio::task::spawn_blocking(python_with_pyjwt)
        .await
        .unwrap();
    let out = Command::new(python)
        .arg(script)
        .arg(&jwks_path)
        .arg(&token)
        .arg(&leash.url)
        .arg(expected.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
