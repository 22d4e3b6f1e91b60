//! One suite for both backends: every behaviour test runs on an embedded SQLite file and on a
//! fresh PostgreSQL database (`LEASH_TEST_POSTGRES`, default the local server as `postgres`).
//! Then what only a cluster has: two PostgreSQL stores (two nodes) on one database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests abort loudly on failure"
)]

use std::sync::Arc;
use std::time::Duration;

use leash_core::audit::Outcome;
use leash_core::dpop::ReplayKey;
use leash_core::grant::{Grant, GrantStatus};
use leash_core::secret::SecretDigest;

use crate::{
    Agent, Approval, ApprovalStatus, AuditQuery, CheckpointSigner, GrantEnd, Login, OAuthConnect,
    OneTimeKind, OneTimeUse, RequestUse, SealedPlace, Session, SingleUse, Store, StoreError,
    UseVerdict, User, VaultEntry,
};

/// A fresh, empty database of one backend, removed when dropped.
struct Fixture {
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL database (the test harness's: dropped with it).
    postgres: Option<leash_testkit::TestDatabase>,
}

impl Fixture {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        Self {
            url,
            _dir: Some(dir),
            postgres: None,
        }
    }

    /// A new database on the test server (`LEASH_TEST_POSTGRES`). No server is a failure,
    /// never a skip.
    async fn postgres() -> Self {
        let database = leash_testkit::TestDatabase::create().await;
        Self {
            url: database.url.clone(),
            _dir: None,
            postgres: Some(database),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        crate::open(&self.url).await.unwrap()
    }

    /// Makes every audit insert fail from outside the store, as a full or broken disk would;
    /// `false` undoes it.
    async fn sabotage_audit(&self, on: bool) {
        match &self.postgres {
            Some(database) => {
                database
                    .execute(if on {
                        "CREATE OR REPLACE FUNCTION sabotage() RETURNS trigger LANGUAGE plpgsql AS \
                         $$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$; \
                         CREATE TRIGGER sabotage BEFORE INSERT ON audit_events \
                         FOR EACH ROW EXECUTE FUNCTION sabotage();"
                    } else {
                        "DROP TRIGGER sabotage ON audit_events"
                    })
                    .await
            }
            None => {
                let path = self.url.trim_start_matches("sqlite://");
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute_batch(if on {
                    "CREATE TRIGGER sabotage BEFORE INSERT ON audit_events \
                     BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;"
                } else {
                    "DROP TRIGGER sabotage"
                })
                .unwrap();
            }
        }
    }
}

/// Runs the body once per backend, as two tests: `name::sqlite` and `name::postgres`.
macro_rules! both_backends {
    ($(#[$meta:meta])* async fn $name:ident($fixture:ident) $body:block) => {
        mod $name {
            use super::*;

            async fn run($fixture: Fixture) $body

            $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run(Fixture::sqlite().await).await;
            }

            $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                run(Fixture::postgres().await).await;
            }
        }
    };
}

fn k(name: &str) -> ReplayKey {
    leash_core::dpop::replay_key("test", "", name)
}

/// A proof's one-time value named `name`, kept until `keep_until`.
fn proof(name: &str, keep_until: i64) -> OneTimeUse {
    OneTimeUse {
        kind: OneTimeKind::Proof,
        key: k(name),
        keep_until,
    }
}

/// A client assertion's one-time value named `name`, kept until `keep_until`.
fn assertion(name: &str, keep_until: i64) -> OneTimeUse {
    OneTimeUse {
        kind: OneTimeKind::Assertion,
        ..proof(name, keep_until)
    }
}

both_backends! {
    async fn consume_once_is_all_or_nothing(fx) {
        let store = fx.open().await;
        let a = assertion("a", 10);
        let b = proof("b", 10);
        assert_eq!(store.consume_once(std::slice::from_ref(&a)).await.unwrap(), None);
        // b is new but a is not: nothing is stored, and a's kind is named wherever it is.
        assert_eq!(store.consume_once(&[a, b]).await.unwrap(), Some(OneTimeKind::Assertion));
        assert_eq!(store.consume_once(&[b, a]).await.unwrap(), Some(OneTimeKind::Assertion));
        assert_eq!(store.consume_once(&[b]).await.unwrap(), None);
    }
}

both_backends! {
    async fn consumed_values_are_known_after_reopening_until_pruned(fx) {
        let store = fx.open().await;
        let a = assertion("a", 100);
        assert_eq!(store.consume_once(&[a]).await.unwrap(), None);
        drop(store);
        let store = fx.open().await;
        let seen = Some(OneTimeKind::Assertion);
        assert_eq!(store.consume_once(&[a]).await.unwrap(), seen);
        assert_eq!(store.consume_once(&[proof("b", 100), a]).await.unwrap(), seen);
        // A refused request consumed none of its values.
        assert_eq!(store.consume_once(&[proof("b", 100)]).await.unwrap(), None);
        store.prune(100).await.unwrap();
        assert_eq!(store.consume_once(&[a]).await.unwrap(), seen, "kept until its time");
        store.prune(101).await.unwrap();
        assert_eq!(store.consume_once(&[a]).await.unwrap(), None, "pruned, then new again");
    }
}

both_backends! {
    async fn parallel_copies_are_consumed_exactly_once(fx) {
        let store = fx.open().await;
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let store = store.clone();
                // Each request shares "proof" and has its own assertion.
                tokio::spawn(async move {
                    store
                        .consume_once(&[assertion(&format!("assertion-{i}"), 10), proof("proof", 10)])
                        .await
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            if task.await.unwrap().unwrap().is_none() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
        // The losers' own assertions were not consumed.
        let mut taken = 0;
        for i in 0..32 {
            let entry = assertion(&format!("assertion-{i}"), 10);
            if store.consume_once(&[entry]).await.unwrap().is_some() {
                taken += 1;
            }
        }
        assert_eq!(taken, 1, "only the winner's assertion is taken");
    }
}

both_backends! {
    async fn a_request_repeating_its_own_value_is_refused(fx) {
        let store = fx.open().await;
        let a = proof("a", 10);
        assert_eq!(store.consume_once(&[a, a]).await.unwrap(), Some(OneTimeKind::Proof));
        assert_eq!(store.consume_once(&[a]).await.unwrap(), None);
    }
}

both_backends! {
    async fn settings_initialise_once(fx) {
        let store = fx.open().await;
        assert_eq!(store.setting("k").await.unwrap(), None);
        assert_eq!(store.init_setting("k", b"one").await.unwrap(), b"one");
        assert_eq!(store.init_setting("k", b"two").await.unwrap(), b"one");
    }
}

both_backends! {
    async fn prune_drops_only_expired_entries(fx) {
        let store = fx.open().await;
        store.consume_once(&[proof("old", 5), proof("new", 50)]).await.unwrap();
        assert_eq!(store.prune(10).await.unwrap(), 1);
        assert_eq!(store.consume_once(&[proof("new", 50)]).await.unwrap(), Some(OneTimeKind::Proof));
        assert_eq!(store.consume_once(&[proof("old", 50)]).await.unwrap(), None);
    }
}

async fn with_grant(store: &dyn Store, max_requests: Option<i64>) -> Grant {
    let user = User {
        id: "usr_1".into(),
        name: "alice".into(),
        created_at: 1,
        disabled: false,
    };
    store
        .create_user(
            &user,
            &SecretDigest::from_stored("d1".into()),
            &ev("user.created"),
        )
        .await
        .unwrap();
    let agent = Agent {
        id: "spiffe://t/a".into(),
        name: "a".into(),
        jwks: serde_json::json!({"keys": []}),
        disabled: false,
        created_at: 1,
    };
    store
        .create_agent(&agent, &ev("agent.registered"))
        .await
        .unwrap();
    let grant = Grant {
        id: "grt_1".into(),
        subject: user.id,
        agent: agent.id,
        purpose: "p".into(),
        upstreams: vec!["mail".into()],
        actions: vec!["mail:read".into()],
        approval_required: Vec::new(),
        single_use: Vec::new(),
        created_at: 1,
        expires_at: 1000,
        max_requests,
        requests_used: 0,
        status: GrantStatus::Active,
    };
    store
        .create_grant(
            &grant,
            &SecretDigest::from_stored("h1".into()),
            &ev("grant.created"),
        )
        .await
        .unwrap();
    grant
}

/// Another grant of the user and agent [`with_grant`] made.
async fn with_grant_named(store: &dyn Store, id: &str, handle: &str) -> Grant {
    let mut grant = store.grant("grt_1").await.unwrap().unwrap();
    grant.id = id.into();
    grant.status = GrantStatus::Active;
    store
        .create_grant(
            &grant,
            &SecretDigest::from_stored(handle.into()),
            &ev("grant.created"),
        )
        .await
        .unwrap();
    grant
}

fn use_of(grant: &Grant, key: &str, now: i64) -> RequestUse {
    RequestUse {
        once: vec![proof(key, 1000)],
        grant: Some(grant.id.clone()),
        now,
        ..RequestUse::default()
    }
}

both_backends! {
    async fn the_grant_and_its_agent_are_found_by_the_handle(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), Some(3)).await;
        let (found, agent) = store
            .grant_by_handle(&SecretDigest::from_stored("h1".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found, grant);
        assert_eq!(agent.id, grant.agent);
        assert!(!agent.disabled);
        assert!(store
            .grant_by_handle(&SecretDigest::from_stored("h2".into()))
            .await
            .unwrap()
            .is_none());
        assert!(matches!(
            store
                .create_grant(&grant, &SecretDigest::from_stored("h3".into()), &ev("grant.created"))
                .await,
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.list_grants(Some("usr_1")).await.unwrap(), vec![grant]);
        assert!(store.list_grants(Some("usr_2")).await.unwrap().is_empty());
    }
}

both_backends! {
    async fn a_cached_grant_dies_with_its_end_and_its_budget(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), Some(2)).await;
        assert!(store.live_grant(&grant.id).await.unwrap().unwrap().is_live(10));
        for (i, expected) in [UseVerdict::Recorded, UseVerdict::Recorded, UseVerdict::GrantSpent]
            .into_iter()
            .enumerate()
        {
            let verdict = store.record_use(use_of(&grant, &format!("p{i}"), 10)).await;
            assert_eq!(verdict.unwrap(), expected, "use {i}");
        }
        // The budget ran out: the grant read from memory says so.
        let cached = store.live_grant(&grant.id).await.unwrap().unwrap();
        assert!(!cached.is_live(10), "an exhausted grant left live in memory");
    }
}

both_backends! {
    /// `GET /metrics`'s live grants are the grants `Grant::is_live` says are live.
    async fn live_grants_are_counted_as_is_live_judges_them(fx) {
        let store = fx.open().await;
        let spent = with_grant(store.as_ref(), Some(1)).await;
        let open = with_grant_named(store.as_ref(), "grt_2", "h2").await;
        let ended = with_grant_named(store.as_ref(), "grt_3", "h3").await;
        assert_eq!(store.gauges(10).await.unwrap().live_grants, 3);
        assert_eq!(store.record_use(use_of(&spent, "p", 10)).await.unwrap(), UseVerdict::Recorded);
        store.end_grant(&ended.id, GrantEnd::Revoked, None, 11, &ev("grant.ended")).await.unwrap().unwrap();
        let gauges = store.gauges(11).await.unwrap();
        assert_eq!(gauges.live_grants, 1, "the spent and the revoked grant still counted");
        assert_eq!(gauges.audit_outbox, 0, "a change's event left outside the chain");
        assert!(store.live_grant(&open.id).await.unwrap().unwrap().is_live(11));
        // At its expiry the last one stops counting.
        assert_eq!(store.gauges(open.expires_at).await.unwrap().live_grants, 0);
    }
}

both_backends! {
    async fn an_ended_grant_is_dead_in_memory_and_spends_nothing(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        assert!(store.live_grant(&grant.id).await.unwrap().unwrap().is_live(10));
        store.end_grant(&grant.id, GrantEnd::Revoked, None, 11, &ev("grant.ended")).await.unwrap().unwrap();
        // A second end finds it no longer active.
        assert!(store.end_grant(&grant.id, GrantEnd::Completed, None, 12, &ev("grant.ended")).await.unwrap().is_none());
        let cached = store.live_grant(&grant.id).await.unwrap().unwrap();
        assert_eq!(cached.status, GrantStatus::Revoked);
        assert_eq!(
            store.record_use(use_of(&grant, "late", 12)).await.unwrap(),
            UseVerdict::GrantSpent
        );
    }
}

both_backends! {
    async fn a_disabled_agent_takes_its_cached_grants_down(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        assert!(store.live_grant(&grant.id).await.unwrap().unwrap().is_live(10));
        assert!(store.disable_agent(&grant.agent, 11, &ev("agent.disabled")).await.unwrap());
        let cached = store.live_grant(&grant.id).await.unwrap().unwrap();
        assert_eq!(cached.status, GrantStatus::Revoked);
        assert!(store.agent(&grant.agent).await.unwrap().unwrap().disabled);
    }
}

both_backends! {
    async fn parallel_uses_never_exceed_the_budget(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), Some(5)).await;
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let (store, request) = (store.clone(), use_of(&grant, &format!("p{i}"), 10));
                tokio::spawn(async move { store.record_use(request).await })
            })
            .collect();
        let mut recorded = 0;
        for task in tasks {
            match task.await.unwrap().unwrap() {
                UseVerdict::Recorded => recorded += 1,
                verdict => assert_eq!(verdict, UseVerdict::GrantSpent),
            }
        }
        assert_eq!(recorded, 5);
        let stored = store.grant(&grant.id).await.unwrap().unwrap();
        assert_eq!(stored.requests_used, 5);
        assert!(!store.live_grant(&grant.id).await.unwrap().unwrap().is_live(10));
    }
}

both_backends! {
    /// A management change that reads before it writes (a first login looks its human up,
    /// then creates them) while the writer commits requests all along: none may fail.
    async fn management_changes_that_read_first_never_fail_beside_the_writer(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let uses = {
            let (store, grant, done) = (store.clone(), grant.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let request = use_of(&grant, &format!("w{i}"), 10);
                    assert_eq!(store.record_use(request).await.unwrap(), UseVerdict::Recorded);
                    i += 1;
                }
                i
            })
        };
        for i in 0..200 {
            let id = format!("usr_oidc_{i}");
            let key = SecretDigest::from_stored(format!("unused-{i}"));
            let user = store
                .oidc_user("https://idp", &format!("sub-{i}"), &person(&id, "alice"), &key, &ev("user.created"))
                .await
                .unwrap();
            assert_eq!(user.id, id);
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(uses.await.unwrap() > 0);
    }
}

/// A use with an audit event, so that the chain shows both ways of committing agree.
fn audited_use(grant: &Grant, key: &str, n: u64) -> RequestUse {
    RequestUse {
        audit: Some(event(n)),
        ..use_of(grant, key, 10)
    }
}

/// At a fleet's load a use finds the writer idle and commits on its caller's thread; under a
/// burst the uses go through the writer thread's group commit. Both ways keep one chain, one
/// set of consumed values and one budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_uses_commit_on_the_callers_thread_and_bursts_through_the_writer() {
    let fx = Fixture::sqlite().await;
    let store = crate::SqliteStore::open(fx.url.trim_start_matches("sqlite://"))
        .await
        .unwrap();
    store.set_checkpoint_signer(sign_with_test_key());
    let grant = with_grant(&store, Some(1_000)).await;
    for n in 0..20 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        // The log's upkeep, due every 25 ms, would send a use now and then to the writer
        // thread; on a slow machine, more of them.
        store.upkeep_checked_just_now();
        let recorded = store
            .record_use(audited_use(&grant, &format!("lone{n}"), n))
            .await;
        assert_eq!(recorded.unwrap(), UseVerdict::Recorded);
    }
    let lone = store.uses_committed_by_callers();
    assert_eq!(lone, 20, "lone uses committed on the caller's thread");

    let burst: Vec<_> = (0..64u64)
        .map(|n| {
            let (store, grant) = (store.clone(), grant.clone());
            tokio::spawn(async move {
                store
                    .record_use(audited_use(&grant, &format!("burst{n}"), 100 + n))
                    .await
            })
        })
        .collect();
    for recorded in burst {
        assert_eq!(recorded.await.unwrap().unwrap(), UseVerdict::Recorded);
    }
    let in_burst = store.uses_committed_by_callers() - lone;
    assert!(
        in_burst <= 8,
        "{in_burst} of a burst of 64 were committed one by one"
    );

    // A replay is refused whichever way the value was consumed, and whichever way it comes.
    for key in ["lone3", "burst7"] {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let replayed = store
            .record_use(audited_use(&grant, key, 500))
            .await
            .unwrap();
        assert_eq!(replayed, UseVerdict::Replayed(OneTimeKind::Proof));
    }
    let replays: Vec<_> = (0..8)
        .map(|_| {
            let (store, grant) = (store.clone(), grant.clone());
            tokio::spawn(async move { store.record_use(use_of(&grant, "lone5", 10)).await })
        })
        .collect();
    for replayed in replays {
        let verdict = replayed.await.unwrap().unwrap();
        assert_eq!(verdict, UseVerdict::Replayed(OneTimeKind::Proof));
    }
    assert_eq!(
        store.grant(&grant.id).await.unwrap().unwrap().requests_used,
        84
    );
    // 84 uses and 2 refused replays audited, after the management events.
    let kinds = kinds(&store).await;
    assert_eq!(
        kinds
            .iter()
            .filter(|kind| *kind == "gateway.request")
            .count(),
        86
    );
    assert_eq!(verify_stored(&store).await, kinds.len() as u64);
}

/// A management change holds SQLite's write lock and needs the very runtime thread a lone use
/// arrives on to finish: the use must not wait for the lock on that thread (it would wait out
/// the whole busy timeout and fail), but go to the writer thread and be committed after.
#[tokio::test(flavor = "current_thread")]
async fn a_lone_use_never_waits_for_the_write_lock_on_its_callers_thread() {
    let fx = Fixture::sqlite().await;
    let path = fx.url.trim_start_matches("sqlite://").to_owned();
    let store = crate::SqliteStore::open(&path).await.unwrap();
    let grant = with_grant(&store, None).await;
    let other = sqlx::SqlitePool::connect(&fx.url).await.unwrap();
    let (locked, holds) = tokio::sync::oneshot::channel();
    let change = tokio::spawn(async move {
        let tx = other.begin_with("BEGIN IMMEDIATE").await.unwrap();
        locked.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.commit().await.unwrap();
    });
    holds.await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    // Every other condition of a caller's-thread commit holds: the use tries it.
    store.upkeep_checked_just_now();
    let started = std::time::Instant::now();
    let recorded = store.record_use(use_of(&grant, "while-locked", 10)).await;
    assert_eq!(recorded.unwrap(), UseVerdict::Recorded);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(store.uses_committed_by_callers(), 0);
    change.await.unwrap();
}

both_backends! {
    async fn a_replayed_use_counts_nothing(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), Some(5)).await;
        assert_eq!(store.record_use(use_of(&grant, "p", 10)).await.unwrap(), UseVerdict::Recorded);
        assert_eq!(
            store.record_use(use_of(&grant, "p", 10)).await.unwrap(),
            UseVerdict::Replayed(OneTimeKind::Proof)
        );
        assert_eq!(store.grant(&grant.id).await.unwrap().unwrap().requests_used, 1);
    }
}

both_backends! {
    async fn revoked_tokens_are_known_after_reopening(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        store.revoke_token("tok_1", &grant.id, 100, &ev("token.revoked")).await.unwrap();
        assert!(store.is_token_revoked("tok_1").await.unwrap());
        drop(store);
        let store = fx.open().await;
        assert!(store.is_token_revoked("tok_1").await.unwrap());
        assert!(!store.is_token_revoked("tok_2").await.unwrap());
        store.prune(101).await.unwrap();
        drop(store);
        let reopened = fx.open().await;
        assert!(!reopened.is_token_revoked("tok_1").await.unwrap());
    }
}

both_backends! {
    async fn a_remembered_credential_follows_replacement_and_deletion(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let entry = |sealed: &[u8]| VaultEntry {
            subject: grant.subject.clone(),
            upstream: "mail".into(),
            kind: "bearer".into(),
            header_name: None,
            sealed: sealed.to_vec(),
            expires_at: None,
            created_at: 1,
            reconnect: false,
            version: 0,
            retry_at: None,
        };
        assert_eq!(store.credential(&grant.subject, "mail").await.unwrap(), None);
        store.put_credential(&entry(b"one"), &ev("credential.stored")).await.unwrap();
        let read = store.credential(&grant.subject, "mail").await.unwrap();
        assert_eq!(read.unwrap().sealed, b"one");
        store.put_credential(&entry(b"two"), &ev("credential.stored")).await.unwrap();
        let read = store.credential(&grant.subject, "mail").await.unwrap();
        assert_eq!(read.unwrap().sealed, b"two");
        assert_eq!(store.list_credentials(&grant.subject).await.unwrap().len(), 1);
        assert!(store.delete_credential(&grant.subject, "mail", &ev("credential.deleted")).await.unwrap());
        assert_eq!(store.credential(&grant.subject, "mail").await.unwrap(), None);
    }
}

both_backends! {
    async fn one_refresher_holds_an_oauth_connection_and_stores_only_over_its_version(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let subject = grant.subject.as_str();
        let entry = VaultEntry {
            subject: subject.into(),
            upstream: "mail".into(),
            kind: "oauth".into(),
            header_name: None,
            sealed: b"tokens-1".to_vec(),
            expires_at: None,
            created_at: 1,
            reconnect: false,
            version: 0,
            retry_at: None,
        };
        store.put_credential(&entry, &ev("credential.connected")).await.unwrap();
        let v = store.credential_now(subject, "mail").await.unwrap().unwrap().version;
        assert!(store.claim_refresh(subject, "mail", v, 100, 120).await.unwrap());
        // Held: nobody else, until the lease runs out.
        assert!(!store.claim_refresh(subject, "mail", v, 101, 121).await.unwrap());
        assert!(!store.claim_refresh(subject, "mail", v, 119, 139).await.unwrap());
        assert!(store.claim_refresh(subject, "mail", v, 120, 140).await.unwrap());
        // A result made from an older row is not stored.
        assert!(!store.store_refreshed(subject, "mail", v - 1, b"stale", &ev("credential.refreshed")).await.unwrap());
        assert!(store.store_refreshed(subject, "mail", v, b"tokens-2", &ev("credential.refreshed")).await.unwrap());
        let now = store.credential(subject, "mail").await.unwrap().unwrap();
        assert_eq!((now.sealed.as_slice(), now.version, now.reconnect), (&b"tokens-2"[..], v + 1, false));
        // The refresh stored ended the lease: the next one may start at once.
        assert!(!store.claim_refresh(subject, "mail", v, 121, 141).await.unwrap());
        assert!(store.claim_refresh(subject, "mail", v + 1, 121, 141).await.unwrap());
        // A passing failure: no try before its back-off ends, and the lease is over.
        store.refresh_failed(subject, "mail", v + 1, Some(200), &ev("credential.refresh_failed")).await.unwrap();
        let backing_off = store.credential(subject, "mail").await.unwrap().unwrap();
        assert_eq!((backing_off.retry_at, backing_off.reconnect), (Some(200), false));
        assert!(!store.claim_refresh(subject, "mail", backing_off.version, 199, 219).await.unwrap());
        assert!(store.claim_refresh(subject, "mail", backing_off.version, 200, 220).await.unwrap());
        store.refresh_failed(subject, "mail", backing_off.version, None, &ev("credential.refresh_failed")).await.unwrap();
        let dead = store.credential(subject, "mail").await.unwrap().unwrap();
        assert!(dead.reconnect);
        assert!(!store.claim_refresh(subject, "mail", dead.version, 500, 520).await.unwrap());
        // Connecting again replaces it: active, and above every version before.
        store.put_credential(&entry, &ev("credential.connected")).await.unwrap();
        let again = store.credential(subject, "mail").await.unwrap().unwrap();
        assert!(!again.reconnect && again.version > dead.version);
    }
}

both_backends! {
    async fn an_oauth_connection_under_way_is_taken_once(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let connect = OAuthConnect {
            subject: grant.subject.clone(),
            upstream: "mail".into(),
            session_digest: Some("abc".into()),
            verifier: "v".repeat(43),
            expires_at: 1_000,
        };
        let state = SecretDigest::of("state-1");
        store.create_connect(&state, &connect).await.unwrap();
        assert_eq!(store.take_connect(&state).await.unwrap(), Some(connect.clone()));
        assert_eq!(store.take_connect(&state).await.unwrap(), None);
        let old = SecretDigest::of("state-2");
        store.create_connect(&old, &OAuthConnect { expires_at: 5, ..connect }).await.unwrap();
        store.prune(10).await.unwrap();
        assert_eq!(store.take_connect(&old).await.unwrap(), None);
    }
}

fn approval_of(grant: &Grant, id: &str) -> Approval {
    Approval {
        id: id.into(),
        grant_id: grant.id.clone(),
        subject: grant.subject.clone(),
        agent: grant.agent.clone(),
        action: "mail:read".into(),
        upstream: "mail".into(),
        method: "POST".into(),
        path: "/messages/1/send".into(),
        query: None,
        body_sha256: "00".into(),
        body_size: 0,
        headers: vec![("content-type".into(), "text/plain; é".into())],
        headers_sha256: "11".into(),
        previewed: false,
        status: ApprovalStatus::Pending,
        requested_at: 5,
        expires_at: 100,
        decided_at: None,
        approver: None,
    }
}

/// A use that only stores a new pending approval.
fn ask(grant: &Grant, id: &str) -> RequestUse {
    RequestUse {
        pending_approval: Some(Box::new(approval_of(grant, id))),
        ..RequestUse::default()
    }
}

both_backends! {
    async fn a_pending_approval_is_stored_with_its_proof_and_event_or_not_at_all(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let mut refusal = event(1);
        refusal.decision = Some(Outcome::ApprovalRequired);
        refusal.reason = Some("apr_1".into());
        let waiting = |id: &str, key: &str| RequestUse {
            once: vec![proof(key, 1000)],
            now: 5,
            pending_approval: Some(Box::new(approval_of(&grant, id))),
            audit: Some(refusal.clone()),
            ..RequestUse::default()
        };
        assert_eq!(store.record_use(waiting("apr_1", "proof")).await.unwrap(), UseVerdict::Recorded);
        // Stored as asked, its headers included (both backends).
        assert_eq!(store.approval("apr_1").await.unwrap().unwrap(), approval_of(&grant, "apr_1"));
        // The same proof again: refused, and the approval it asks for is not stored.
        assert_eq!(store.record_use(waiting("apr_2", "proof")).await.unwrap(), UseVerdict::Replayed(OneTimeKind::Proof));
        assert_eq!(store.approval("apr_2").await.unwrap(), None);
        // Refused for another reason (its grant ended meanwhile): its approval is not stored.
        store.end_grant(&grant.id, GrantEnd::Revoked, None, 6, &ev("grant.ended")).await.unwrap().unwrap();
        let counted = RequestUse { grant: Some(grant.id.clone()), ..waiting("apr_3", "fresh") };
        assert_eq!(store.record_use(counted).await.unwrap(), UseVerdict::GrantSpent);
        assert_eq!(store.approval("apr_3").await.unwrap(), None);
        assert_eq!(store.list_approvals(None).await.unwrap().len(), 1);
        // Both requests are in the chain: the first as asked, the replay as a deny.
        let lines = store.audit_lines(&AuditQuery { limit: u32::MAX, ..AuditQuery::default() }).await.unwrap();
        let outcomes: Vec<(String, String)> = lines
            .iter()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|event| event["kind"] == "gateway.request")
            .map(|event| (event["decision"].as_str().unwrap().to_owned(), event["reason"].as_str().unwrap().to_owned()))
            .collect();
        let expected = [("approval_required", "apr_1"), ("deny", "replayed"), ("deny", "grant_spent")];
        assert_eq!(outcomes, expected.map(|(d, r)| (d.to_owned(), r.to_owned())));
        assert!(verify_stored(store.as_ref()).await > 0);
    }
}

both_backends! {
    async fn every_sealed_value_is_resealed_in_one_transaction_or_none_is(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        store.init_setting("sealed_key", b"s1").await.unwrap();
        store.init_setting("plain_digest", b"p1").await.unwrap();
        let entry = VaultEntry {
            subject: grant.subject.clone(),
            upstream: "mail".into(),
            kind: "header".into(),
            header_name: Some("X-Api-Key".into()),
            sealed: b"v1".to_vec(),
            expires_at: None,
            created_at: 1,
            reconnect: false,
            version: 0,
            retry_at: None,
        };
        store.put_credential(&entry, &ev("credential.stored")).await.unwrap();
        let mut approval = approval_of(&grant, "apr_1");
        approval.previewed = true;
        store
            .record_use(RequestUse {
                pending_approval: Some(Box::new(approval)),
                pending_preview: Some(b"b1".to_vec()),
                ..RequestUse::default()
            })
            .await
            .unwrap();
        let before = store.credential(&grant.subject, "mail").await.unwrap().unwrap();
        // Fails at the last value: nothing changed, not even what came before it.
        let failing = |place: &SealedPlace, sealed: &[u8]| match place {
            SealedPlace::Preview(_) => Err("does not open".to_owned()),
            SealedPlace::Setting(name) if name.starts_with("plain") => Ok(None),
            _ => Ok(Some([b"new-", sealed].concat())),
        };
        assert!(store.reseal_all(&failing, None).await.is_err());
        assert_eq!(store.setting("sealed_key").await.unwrap().unwrap(), b"s1");
        assert_eq!(store.credential(&grant.subject, "mail").await.unwrap().unwrap(), before);
        // Whole: each place seen once, with what the context needs; unsealed settings kept.
        let seen = std::sync::Mutex::new(Vec::new());
        let whole = |place: &SealedPlace, sealed: &[u8]| {
            seen.lock().unwrap().push(place.clone());
            match place {
                SealedPlace::Setting(name) if name.starts_with("plain") => Ok(None),
                _ => Ok(Some([b"new-", sealed].concat())),
            }
        };
        store.reseal_all(&whole, None).await.unwrap();
        let seen = seen.into_inner().unwrap();
        assert!(seen.contains(&SealedPlace::Vault {
            subject: grant.subject.clone(),
            upstream: "mail".into(),
            kind: "header".into(),
            header_name: Some("X-Api-Key".into()),
        }));
        assert!(seen.contains(&SealedPlace::Preview("apr_1".into())));
        assert_eq!(store.setting("sealed_key").await.unwrap().unwrap(), b"new-s1");
        assert_eq!(store.setting("plain_digest").await.unwrap().unwrap(), b"p1");
        let after = store.credential(&grant.subject, "mail").await.unwrap().unwrap();
        assert_eq!(after.sealed, b"new-v1");
        // The plaintext is the same: a refresh under way may still store over its version.
        assert_eq!(after.version, before.version);
        assert_eq!(store.approval_preview("apr_1").await.unwrap().unwrap(), b"new-b1");
    }
}

both_backends! {
    async fn a_kept_body_lives_only_while_its_approval_is_pending(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let with_preview = |id: &str| {
            let mut approval = approval_of(&grant, id);
            approval.previewed = true;
            RequestUse {
                pending_approval: Some(Box::new(approval)),
                pending_preview: Some(format!("sealed {id}").into_bytes()),
                ..RequestUse::default()
            }
        };
        store.record_use(with_preview("apr_1")).await.unwrap();
        store.record_use(with_preview("apr_2")).await.unwrap();
        assert!(store.approval("apr_1").await.unwrap().unwrap().previewed);
        assert_eq!(store.approval_preview("apr_1").await.unwrap(), Some(b"sealed apr_1".to_vec()));
        // Decided: gone.
        store.decide_approval("apr_1", false, "usr_1", 6, &ev("approval.decided")).await.unwrap().unwrap();
        assert_eq!(store.approval_preview("apr_1").await.unwrap(), None);
        // Expired (at 100) and pruned: gone; before that, kept.
        store.prune(99).await.unwrap();
        assert!(store.approval_preview("apr_2").await.unwrap().is_some());
        store.prune(100).await.unwrap();
        assert_eq!(store.approval_preview("apr_2").await.unwrap(), None);
    }
}

both_backends! {
    async fn an_approval_is_decided_once_and_used_once(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        store.record_use(ask(&grant, "apr_1")).await.unwrap();
        let decided = store.decide_approval("apr_1", true, "usr_1", 6, &ev("approval.decided")).await.unwrap().unwrap();
        assert_eq!((decided.status, decided.approver.as_deref()), (ApprovalStatus::Approved, Some("usr_1")));
        assert!(store.decide_approval("apr_1", false, "usr_1", 7, &ev("approval.decided")).await.unwrap().is_none());
        let spend = |key: &str| RequestUse {
            approval: Some("apr_1".into()),
            ..use_of(&grant, key, 10)
        };
        assert_eq!(store.record_use(spend("a")).await.unwrap(), UseVerdict::Recorded);
        assert_eq!(store.record_use(spend("b")).await.unwrap(), UseVerdict::ApprovalSpent);
        let used = store.approval("apr_1").await.unwrap().unwrap();
        assert_eq!(used.status, ApprovalStatus::Used);
        assert_eq!(store.list_approvals(Some("usr_1")).await.unwrap(), vec![used]);
    }
}

fn event(n: u64) -> leash_core::audit::AuditEvent {
    let mut event = leash_core::audit::AuditEvent::new(
        "gateway.request",
        leash_core::audit::Mode::Delegated,
        1_800_000_000 + n as i64,
    );
    event.subject = Some(format!("usr_{}", n % 2));
    event.decision = Some(Outcome::Allow);
    event
}

/// A management change's event (the store records it with the change).
fn ev(kind: &str) -> leash_core::audit::AuditEvent {
    leash_core::audit::AuditEvent::new(kind, leash_core::audit::Mode::System, 1_800_000_000)
}

/// The kinds of the chain's events, in order.
async fn kinds(store: &dyn Store) -> Vec<String> {
    let query = AuditQuery {
        limit: u32::MAX,
        ..AuditQuery::default()
    };
    store
        .audit_lines(&query)
        .await
        .unwrap()
        .iter()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            event["kind"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn test_key() -> leash_core::token::SigningKey {
    leash_core::token::SigningKey::new(ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]))
}

async fn verify_stored(store: &dyn Store) -> u64 {
    let key = test_key().public();
    let checkpoints = store.checkpoints(0).await.unwrap();
    let mut verifier =
        leash_core::audit::ChainVerifier::new(&checkpoints, |_| Some(key.clone())).unwrap();
    let query = AuditQuery {
        limit: u32::MAX,
        ..AuditQuery::default()
    };
    for line in store.audit_lines(&query).await.unwrap() {
        verifier.push(&line).unwrap();
    }
    verifier.finish().unwrap()
}

/// Appends `count` events, each from its own task.
fn append_in_parallel(
    store: &Arc<dyn Store>,
    count: u64,
) -> Vec<tokio::task::JoinHandle<crate::StoreResult<()>>> {
    (0..count)
        .map(|n| {
            let store = Arc::clone(store);
            tokio::spawn(async move { store.append_audit(event(n)).await })
        })
        .collect()
}

fn sign_with_test_key() -> CheckpointSigner {
    let key = test_key();
    Arc::new(move |seq, hash| {
        leash_core::audit::Checkpoint::sign(&key, seq, hash, 1_800_000_000).ok()
    })
}

both_backends! {
    async fn parallel_appends_form_one_chain_with_checkpoints_every_thousand_events(fx) {
        let store = fx.open().await;
        store.set_checkpoint_signer(sign_with_test_key());
        for task in append_in_parallel(&store, 2_100) {
            task.await.unwrap().unwrap();
        }
        assert_eq!(verify_stored(store.as_ref()).await, 2_100);
        let seqs: Vec<u64> = store.checkpoints(0).await.unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(seqs, vec![1_000, 2_000]);
        let latest = store.checkpoint_now().await.unwrap().unwrap();
        assert_eq!(latest.seq, 2_100);
        // A reopened store continues the same chain.
        drop(store);
        let reopened = fx.open().await;
        reopened.append_audit(event(9)).await.unwrap();
        assert_eq!(verify_stored(reopened.as_ref()).await, 2_101);
        let mine = reopened
            .audit_lines(&AuditQuery {
                subject: Some("usr_1".into()),
                since_seq: 2_000,
                limit: 10,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(mine.len(), 10);
        assert!(mine.iter().all(|line| line.contains(r#""subject":"usr_1""#)));
    }
}

both_backends! {
    /// A checkpoint asked for while appends stream in ends the open batch: it signs only what
    /// was committed, so every checkpoint matches the chain at its seq.
    async fn checkpoints_asked_for_during_appends_sign_committed_heads(fx) {
        let store = fx.open().await;
        store.set_checkpoint_signer(sign_with_test_key());
        // One event committed and signed first, so the count below holds however the tasks
        // are scheduled (on a loaded machine they may all run after every append).
        store.append_audit(event(600)).await.unwrap();
        store.checkpoint_now().await.unwrap();
        let checkpoints: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.checkpoint_now().await })
            })
            .collect();
        let appends = append_in_parallel(&store, 599);
        for task in appends {
            task.await.unwrap().unwrap();
        }
        for task in checkpoints {
            task.await.unwrap().unwrap();
        }
        store.checkpoint_now().await.unwrap();
        let signed = store.checkpoints(0).await.unwrap();
        assert!(signed.len() >= 2, "only {} checkpoints", signed.len());
        assert_eq!(signed.last().map(|c| c.seq), Some(600));
        // The verifier checks each checkpoint's hash against the chain at its seq.
        assert_eq!(verify_stored(store.as_ref()).await, 600);
    }
}

both_backends! {
    async fn a_refused_use_is_audited_as_a_deny_and_allowed_uses_are_counted(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let mut first = use_of(&grant, "a", 10);
        let mut allowed = event(1);
        allowed.kind = "gateway.request".into();
        allowed.grant_id = Some(grant.id.clone());
        allowed.action = Some("mail:read".into());
        first.audit = Some(allowed);
        assert_eq!(store.record_use(first).await.unwrap(), UseVerdict::Recorded);
        let mut replay = use_of(&grant, "a", 10);
        replay.audit = Some(event(2));
        assert_eq!(store.record_use(replay).await.unwrap(), UseVerdict::Replayed(OneTimeKind::Proof));
        // After the user's, agent's and grant's events.
        let lines = store
            .audit_lines(&AuditQuery { since_seq: 3, limit: 10, ..AuditQuery::default() })
            .await
            .unwrap();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains(r#""decision":"allow""#));
        assert!(lines[1].contains(r#""decision":"deny""#) && lines[1].contains(r#""reason":"replayed""#));
        let uses = store.action_uses(None).await.unwrap();
        assert_eq!(uses.len(), 1);
        assert_eq!((uses[0].action.as_str(), uses[0].count), ("mail:read", 1));
    }
}

both_backends! {
    async fn a_failed_audit_write_stores_nothing_and_the_chain_goes_on(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        store.append_audit(event(1)).await.unwrap();
        fx.sabotage_audit(true).await;
        let mut request = use_of(&grant, "b", 10);
        request.audit = Some(event(2));
        assert!(matches!(store.record_use(request).await, Err(StoreError::Unavailable(_))));
        // Nothing of the failed request stayed: its proof and its count were rolled back.
        assert_eq!(store.grant(&grant.id).await.unwrap().unwrap().requests_used, 0);
        fx.sabotage_audit(false).await;
        let mut retry = use_of(&grant, "b", 10);
        retry.audit = Some(event(3));
        assert_eq!(store.record_use(retry).await.unwrap(), UseVerdict::Recorded);
        // The user's, agent's and grant's events, then the two appended here.
        assert_eq!(verify_stored(store.as_ref()).await, 5);
    }
}

both_backends! {
    async fn a_change_is_chained_with_its_event_only_when_it_takes_effect(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        assert_eq!(kinds(store.as_ref()).await, ["user.created", "agent.registered", "grant.created"]);
        let (revoked, again) = (ev("grant.revoked"), ev("grant.revoked.again"));
        assert!(store.end_grant(&grant.id, GrantEnd::Revoked, None, 11, &revoked).await.unwrap().is_some());
        // Not active any more: no change, so no event.
        assert!(store.end_grant(&grant.id, GrantEnd::Revoked, None, 11, &again).await.unwrap().is_none());
        let deleted = ev("credential.deleted");
        assert!(!store.delete_credential(&grant.subject, "mail", &deleted).await.unwrap());
        assert!(!store.disable_agent("agt_nobody", 12, &ev("agent.disabled")).await.unwrap());
        assert_eq!(
            kinds(store.as_ref()).await,
            ["user.created", "agent.registered", "grant.created", "grant.revoked"]
        );
        // A change that fails stores no event either.
        let (handle, created) = (SecretDigest::from_stored("h9".into()), ev("grant.created.again"));
        assert!(matches!(store.create_grant(&grant, &handle, &created).await, Err(StoreError::Conflict)));
        assert_eq!(verify_stored(store.as_ref()).await, 4);
    }
}

both_backends! {
    /// A change whose event cannot join the chain right away (a full or broken disk, the
    /// process killed in between) is kept with its event, which joins the chain at the next
    /// checkpoint or start; the change is never stored without it.
    async fn a_change_keeps_its_event_until_the_chain_takes_it(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        fx.sabotage_audit(true).await;
        let completed = ev("grant.completed");
        let ended = store.end_grant(&grant.id, GrantEnd::Completed, None, 11, &completed).await;
        assert!(ended.unwrap().is_some(), "the change and its event are both stored");
        assert_eq!(kinds(store.as_ref()).await.len(), 3, "not in the chain yet");
        fx.sabotage_audit(false).await;
        store.checkpoint_now().await.unwrap();
        assert_eq!(kinds(store.as_ref()).await.last().map(String::as_str), Some("grant.completed"));

        fx.sabotage_audit(true).await;
        store.revoke_token("tok_1", &grant.id, 100, &ev("token.revoked")).await.unwrap();
        drop(store);
        fx.sabotage_audit(false).await;
        let store = fx.open().await;
        assert_eq!(kinds(store.as_ref()).await.last().map(String::as_str), Some("token.revoked"));
        assert_eq!(verify_stored(store.as_ref()).await, 5);
        // Each event joined the chain once.
        store.checkpoint_now().await.unwrap();
        assert_eq!(verify_stored(store.as_ref()).await, 5);
    }
}

/// Token `jti`'s single use of the action (the gateway's key is built alike).
fn single(jti: &str, spend: bool) -> SingleUse {
    SingleUse {
        value: OneTimeUse {
            kind: OneTimeKind::SingleUse,
            key: leash_core::dpop::replay_key("single_use", jti, "mail:send"),
            keep_until: 1000,
        },
        spend,
    }
}

/// A use by token `jti` of its single-use action, with the proof `key`.
fn single_use_of(grant: &Grant, jti: &str, key: &str, spend: bool) -> RequestUse {
    RequestUse {
        single_use: Some(single(jti, spend)),
        token: Some(jti.into()),
        ..use_of(grant, key, 10)
    }
}

async fn requests_used(store: &dyn Store, grant: &Grant) -> i64 {
    store.grant(&grant.id).await.unwrap().unwrap().requests_used
}

/// The decision and reason of each `gateway.request` event in the chain.
async fn request_outcomes(store: &dyn Store) -> Vec<(String, String)> {
    let query = AuditQuery {
        limit: u32::MAX,
        ..AuditQuery::default()
    };
    store
        .audit_lines(&query)
        .await
        .unwrap()
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|event| event["kind"] == "gateway.request")
        .map(|event| {
            let text = |name: &str| event[name].as_str().unwrap_or_default().to_owned();
            (text("decision"), text("reason"))
        })
        .collect()
}

both_backends! {
    /// ATTACKS 45: a token's single use of an action is consumed by its first recorded use
    /// only. Asking for an approval checks it without consuming it, a use refused for another
    /// reason leaves it, and once used every further use or check by that token is refused,
    /// counting and consuming nothing.
    async fn a_single_use_action_used_twice_with_one_token_is_refused(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let checked = single_use_of(&grant, "tok_1", "ask", false);
        assert_eq!(store.record_use(checked).await.unwrap(), UseVerdict::Recorded);
        let refused = RequestUse {
            approval: Some("apr_unknown".into()),
            ..single_use_of(&grant, "tok_1", "refused", true)
        };
        assert_eq!(store.record_use(refused).await.unwrap(), UseVerdict::ApprovalSpent);
        let first = single_use_of(&grant, "tok_1", "first", true);
        assert_eq!(store.record_use(first).await.unwrap(), UseVerdict::Recorded);
        let used = requests_used(store.as_ref(), &grant).await;

        let mut second = single_use_of(&grant, "tok_1", "second", true);
        second.audit = Some(event(1));
        assert_eq!(store.record_use(second).await.unwrap(), UseVerdict::Replayed(OneTimeKind::SingleUse));
        let checked = single_use_of(&grant, "tok_1", "check", false);
        assert_eq!(store.record_use(checked).await.unwrap(), UseVerdict::Replayed(OneTimeKind::SingleUse));
        assert_eq!(requests_used(store.as_ref(), &grant).await, used, "a refused use was counted");
        assert_eq!(
            store.consume_once(&[proof("second", 1000)]).await.unwrap(),
            None,
            "a refused use consumed its proof"
        );
        assert_eq!(request_outcomes(store.as_ref()).await, [("deny".to_owned(), "single_use_spent".to_owned())]);
        // Another token's single use of the action is its own.
        let other = single_use_of(&grant, "tok_2", "other", true);
        assert_eq!(store.record_use(other).await.unwrap(), UseVerdict::Recorded);
        // Durable: refused after reopening too.
        drop(store);
        let store = fx.open().await;
        let after = single_use_of(&grant, "tok_1", "after", true);
        assert_eq!(store.record_use(after).await.unwrap(), UseVerdict::Replayed(OneTimeKind::SingleUse));
    }
}

both_backends! {
    /// ATTACKS 45: of parallel uses of one token's single use, with distinct proofs, exactly
    /// one is recorded and counted.
    async fn of_parallel_uses_of_a_single_use_exactly_one_is_recorded(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                let request = single_use_of(&grant, "tok_1", &format!("p{i}"), true);
                tokio::spawn(async move { store.record_use(request).await })
            })
            .collect();
        let mut verdicts = Vec::new();
        for task in tasks {
            verdicts.push(task.await.unwrap().unwrap());
        }
        let recorded = verdicts.iter().filter(|v| **v == UseVerdict::Recorded).count();
        assert_eq!(recorded, 1, "{verdicts:?}");
        assert!(verdicts.iter().all(|v| matches!(v, UseVerdict::Recorded | UseVerdict::Replayed(OneTimeKind::SingleUse))), "{verdicts:?}");
        assert_eq!(requests_used(store.as_ref(), &grant).await, 1);
    }
}

both_backends! {
    /// ATTACKS 52: a use naming a token revoked after its request was checked is refused at
    /// its commit and audited as such; it counts nothing and spends neither its approval nor
    /// its single use, which stay for the grant's other tokens. The revocation holds after
    /// reopening.
    async fn a_use_naming_a_revoked_token_is_refused_at_commit(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        store.record_use(ask(&grant, "apr_1")).await.unwrap();
        store.decide_approval("apr_1", true, "usr_1", 6, &ev("approval.decided")).await.unwrap().unwrap();
        let approved = |jti: &str, key: &str| RequestUse {
            approval: Some("apr_1".into()),
            audit: Some(event(1)),
            ..single_use_of(&grant, jti, key, true)
        };
        store.revoke_token("tok_1", &grant.id, 100, &ev("token.revoked")).await.unwrap();
        assert_eq!(store.record_use(approved("tok_1", "a")).await.unwrap(), UseVerdict::TokenRevoked);
        assert_eq!(requests_used(store.as_ref(), &grant).await, 0);
        assert_eq!(store.approval("apr_1").await.unwrap().unwrap().status, ApprovalStatus::Approved);
        // Another token of the grant: not revoked, so its use is recorded.
        assert_eq!(store.record_use(approved("tok_2", "b")).await.unwrap(), UseVerdict::Recorded);
        assert_eq!(store.approval("apr_1").await.unwrap().unwrap().status, ApprovalStatus::Used);
        drop(store);
        let store = fx.open().await;
        let plain = RequestUse { token: Some("tok_1".into()), audit: Some(event(2)), ..use_of(&grant, "c", 10) };
        assert_eq!(store.record_use(plain).await.unwrap(), UseVerdict::TokenRevoked);
        assert_eq!(requests_used(store.as_ref(), &grant).await, 1);
        let expected = [("deny", "token_revoked"), ("allow", ""), ("deny", "token_revoked")];
        assert_eq!(
            request_outcomes(store.as_ref()).await,
            expected.map(|(d, r)| (d.to_owned(), r.to_owned()))
        );
        assert!(verify_stored(store.as_ref()).await > 0);
    }
}

both_backends! {
    /// ATTACKS 52: a token exchange commits only while its grant is live, checked again in
    /// its commit: a grant expired, used up or revoked since it was read issues no token. An
    /// exchange does not count against the budget.
    async fn an_exchange_commits_only_while_its_grant_is_live_and_counts_nothing(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), Some(1)).await;
        let other = with_grant_named(store.as_ref(), "grt_2", "h2").await;
        let exchange = |grant: &Grant, key: &str, now: i64| RequestUse {
            once: vec![proof(key, 1000)],
            exchanged_grant: Some(grant.id.clone()),
            now,
            audit: Some(event(1)),
            ..RequestUse::default()
        };
        assert_eq!(store.record_use(exchange(&grant, "x1", 10)).await.unwrap(), UseVerdict::Recorded);
        assert_eq!(requests_used(store.as_ref(), &grant).await, 0, "an exchange was counted");
        assert_eq!(store.record_use(exchange(&grant, "x2", 1000)).await.unwrap(), UseVerdict::GrantSpent, "expired");
        assert_eq!(store.record_use(use_of(&grant, "u", 10)).await.unwrap(), UseVerdict::Recorded);
        assert_eq!(store.record_use(exchange(&grant, "x3", 10)).await.unwrap(), UseVerdict::GrantSpent, "used up");
        store.end_grant(&other.id, GrantEnd::Revoked, None, 11, &ev("grant.revoked")).await.unwrap().unwrap();
        assert_eq!(store.record_use(exchange(&other, "x4", 12)).await.unwrap(), UseVerdict::GrantSpent, "revoked");
        let refused = request_outcomes(store.as_ref()).await;
        assert_eq!(refused.iter().filter(|(d, r)| d == "deny" && r == "grant_spent").count(), 3, "{refused:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster: two nodes (two stores) on one PostgreSQL database.

/// Polls `check` until it holds, for at most `limit`; returns how long it took.
async fn within(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_many_refreshers_on_two_nodes_exactly_one_claims_the_refresh() {
    let fx = Fixture::postgres().await;
    let (a, b) = (fx.open().await, fx.open().await);
    let grant = with_grant(a.as_ref(), None).await;
    let entry = VaultEntry {
        subject: grant.subject.clone(),
        upstream: "mail".into(),
        kind: "oauth".into(),
        header_name: None,
        sealed: b"tokens".to_vec(),
        expires_at: None,
        created_at: 1,
        reconnect: false,
        version: 0,
        retry_at: None,
    };
    a.put_credential(&entry, &ev("credential.connected"))
        .await
        .unwrap();
    let version = b
        .credential_now(&grant.subject, "mail")
        .await
        .unwrap()
        .unwrap()
        .version;
    let mut claims = tokio::task::JoinSet::new();
    for i in 0..40 {
        let node = if i % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        let subject = grant.subject.clone();
        claims.spawn(async move {
            node.claim_refresh(&subject, "mail", version, 100, 130)
                .await
                .unwrap()
        });
    }
    let won = claims
        .join_all()
        .await
        .into_iter()
        .filter(|&won| won)
        .count();
    assert_eq!(won, 1, "one refresher across the cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_value_or_approval_used_on_one_node_is_refused_on_the_other() {
    let fx = Fixture::postgres().await;
    let (a, b) = (fx.open().await, fx.open().await);
    let grant = with_grant(a.as_ref(), Some(3)).await;
    assert_eq!(a.consume_once(&[proof("proof", 100)]).await.unwrap(), None);
    assert_eq!(
        b.consume_once(&[proof("proof", 100)]).await.unwrap(),
        Some(OneTimeKind::Proof)
    );
    b.record_use(ask(&grant, "apr_1")).await.unwrap();
    a.decide_approval("apr_1", true, "usr_1", 6, &ev("approval.decided"))
        .await
        .unwrap()
        .unwrap();
    let spend = |key: &str| RequestUse {
        approval: Some("apr_1".into()),
        ..use_of(&grant, key, 10)
    };
    assert_eq!(
        b.record_use(spend("x")).await.unwrap(),
        UseVerdict::Recorded
    );
    assert_eq!(
        a.record_use(spend("y")).await.unwrap(),
        UseVerdict::ApprovalSpent
    );
    // The budget of 3 holds across nodes: one use above, two more, then spent on either node.
    assert_eq!(
        a.record_use(use_of(&grant, "u1", 10)).await.unwrap(),
        UseVerdict::Recorded
    );
    assert_eq!(
        b.record_use(use_of(&grant, "u2", 10)).await.unwrap(),
        UseVerdict::Recorded
    );
    assert_eq!(
        a.record_use(use_of(&grant, "u3", 10)).await.unwrap(),
        UseVerdict::GrantSpent
    );
    assert_eq!(
        b.record_use(use_of(&grant, "u4", 10)).await.unwrap(),
        UseVerdict::GrantSpent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_an_end_or_revocation_on_one_node_reaches_the_others_memory() {
    let fx = Fixture::postgres().await;
    let (a, b) = (fx.open().await, fx.open().await);
    let grant = with_grant(a.as_ref(), None).await;
    // Node B holds the grant, a credential and a token's status in memory.
    assert!(b.live_grant(&grant.id).await.unwrap().unwrap().is_live(10));
    assert!(!b.is_token_revoked("tok_1").await.unwrap());
    let entry = VaultEntry {
        subject: grant.subject.clone(),
        upstream: "mail".into(),
        kind: "bearer".into(),
        header_name: None,
        sealed: b"one".to_vec(),
        expires_at: None,
        created_at: 1,
        reconnect: false,
        version: 0,
        retry_at: None,
    };
    a.put_credential(&entry, &ev("credential.stored"))
        .await
        .unwrap();
    assert!(
        b.credential(&grant.subject, "mail")
            .await
            .unwrap()
            .is_some()
    );

    let limit = Duration::from_secs(1);
    a.revoke_token("tok_1", &grant.id, 100, &ev("token.revoked"))
        .await
        .unwrap();
    let took = within(limit, async || b.is_token_revoked("tok_1").await.unwrap()).await;
    assert!(
        took.is_some(),
        "a token revoked on A is still good on B after 1 s"
    );
    a.delete_credential(&grant.subject, "mail", &ev("credential.deleted"))
        .await
        .unwrap();
    let took = within(limit, async || {
        b.credential(&grant.subject, "mail")
            .await
            .unwrap()
            .is_none()
    })
    .await;
    assert!(
        took.is_some(),
        "a deleted credential is still injected by B after 1 s"
    );
    a.end_grant(&grant.id, GrantEnd::Revoked, None, 11, &ev("grant.ended"))
        .await
        .unwrap()
        .unwrap();
    let took = within(limit, async || {
        !b.live_grant(&grant.id).await.unwrap().unwrap().is_live(12)
    })
    .await;
    assert!(
        took.is_some(),
        "a grant revoked on A is live on B after 1 s"
    );

    // An agent disabled on A takes its grants down in B's memory too.
    let second = with_grant_named(a.as_ref(), "grt_2", "h2").await;
    assert!(b.live_grant(&second.id).await.unwrap().unwrap().is_live(12));
    assert!(
        a.disable_agent(&second.agent, 12, &ev("agent.disabled"))
            .await
            .unwrap()
    );
    let took = within(limit, async || {
        b.live_grant(&second.id).await.unwrap().unwrap().status == GrantStatus::Revoked
    })
    .await;
    assert!(
        took.is_some(),
        "a disabled agent's grant is live on B after 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_appends_from_two_nodes_form_one_chain() {
    let fx = Fixture::postgres().await;
    let nodes = [fx.open().await, fx.open().await];
    for node in &nodes {
        node.set_checkpoint_signer(sign_with_test_key());
    }
    let tasks: Vec<_> = (0..1_200u64)
        .map(|n| {
            let node = nodes[(n % 2) as usize].clone();
            tokio::spawn(async move { node.append_audit(event(n)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(nodes[1].checkpoint_now().await.unwrap().unwrap().seq, 1_200);
    for node in &nodes {
        assert_eq!(verify_stored(node.as_ref()).await, 1_200);
    }
}

/// Management changes on two nodes, among request uses: every change's event joins the one
/// chain exactly once, and an event one node could not chain is chained by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_changes_on_two_nodes_are_chained_once_each() {
    let fx = Fixture::postgres().await;
    let nodes = [fx.open().await, fx.open().await];
    let grant = with_grant(nodes[0].as_ref(), None).await;
    let tasks: Vec<_> = (0..160u64)
        .map(|n| {
            let node = nodes[(n % 2) as usize].clone();
            let grant_id = grant.id.clone();
            tokio::spawn(async move {
                if n % 4 < 2 {
                    let event = ev("token.revoked");
                    node.revoke_token(&format!("tok_{n}"), &grant_id, 100, &event)
                        .await
                } else {
                    node.append_audit(event(n)).await
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    fx.sabotage_audit(true).await;
    let left = ev("credential.deleted");
    let stored = VaultEntry {
        subject: grant.subject.clone(),
        upstream: "mail".into(),
        kind: "bearer".into(),
        header_name: None,
        sealed: b"x".to_vec(),
        expires_at: None,
        created_at: 1,
        reconnect: false,
        version: 0,
        retry_at: None,
    };
    nodes[0]
        .put_credential(&stored, &ev("credential.stored"))
        .await
        .unwrap();
    assert!(
        nodes[0]
            .delete_credential(&grant.subject, "mail", &left)
            .await
            .unwrap()
    );
    fx.sabotage_audit(false).await;
    nodes[1].checkpoint_now().await.unwrap();
    let chained = kinds(nodes[0].as_ref()).await;
    let count = |kind: &str| chained.iter().filter(|k| *k == kind).count();
    assert_eq!(count("token.revoked"), 80);
    assert_eq!(count("gateway.request"), 80);
    assert_eq!(
        chained[chained.len() - 2..],
        ["credential.stored", "credential.deleted"]
    );
    assert_eq!(verify_stored(nodes[1].as_ref()).await, 3 + 160 + 2);
}

#[test]
fn a_database_password_is_never_shown() {
    assert_eq!(
        crate::display_url("postgres://leash:s3cret@db.internal:5432/leash"),
        "postgres://leash:***@db.internal:5432/leash"
    );
    assert_eq!(
        crate::display_url("sqlite:///var/lib/leash/leash.db"),
        "sqlite:///var/lib/leash/leash.db"
    );
}

#[tokio::test]
async fn a_failed_connection_names_the_server_without_its_password() {
    let error = crate::open("postgres://leash:s3cret@127.0.0.1:1/leash")
        .await
        .unwrap_err()
        .to_string();
    assert!(!error.contains("s3cret"), "{error}");
    let unsupported = crate::open("mysql://leash:s3cret@127.0.0.1/leash")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        !unsupported.contains("s3cret") && unsupported.contains("***"),
        "{unsupported}"
    );
}

/// A prune of many expired values goes in steps: a request that arrives while it runs is
/// committed between two steps instead of waiting behind one long delete, which would hold
/// SQLite's write lock, and every request with it, for as long as it deletes.
#[tokio::test]
async fn a_large_prune_lets_requests_through_between_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db").display().to_string();
    let store: Arc<dyn Store> = Arc::new(crate::SqliteStore::open(&path).await.unwrap());
    let expired: Vec<OneTimeUse> = (0..100 * crate::sqlite::writer::PRUNE_STEP)
        .map(|i| proof(&format!("old {i}"), 5))
        .collect();
    assert_eq!(store.consume_once(&expired).await.unwrap(), None);
    let kept = proof("kept", 50);
    assert_eq!(store.consume_once(&[kept]).await.unwrap(), None);

    let reader = rusqlite::Connection::open(&path).unwrap();
    let left = || -> usize {
        reader
            .query_row("SELECT count(*) FROM replay WHERE until < 10", [], |row| {
                row.get(0)
            })
            .unwrap()
    };
    let pruning = store.clone();
    let prune = tokio::spawn(async move { pruning.prune(10).await });
    // The request is sent once the prune's first step has committed.
    while left() == expired.len() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(store.consume_once(&[proof("new", 50)]).await.unwrap(), None);
    assert!(left() > 0, "the request waited for the whole prune");
    let deleted = prune.await.unwrap().unwrap();
    assert_eq!(deleted, expired.len() as u64);
    assert_eq!(
        store.consume_once(&expired[..1]).await.unwrap(),
        None,
        "a pruned value is new again"
    );
    assert_eq!(
        store.consume_once(&[kept]).await.unwrap(),
        Some(OneTimeKind::Proof),
        "a value kept past the prune's time is still refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_single_use_or_revocation_on_one_node_holds_at_the_others_commit() {
    let fx = Fixture::postgres().await;
    let (a, b) = (fx.open().await, fx.open().await);
    let grant = with_grant(a.as_ref(), None).await;
    let first = single_use_of(&grant, "tok_1", "p1", true);
    assert_eq!(a.record_use(first).await.unwrap(), UseVerdict::Recorded);
    let second = single_use_of(&grant, "tok_1", "p2", true);
    assert_eq!(
        b.record_use(second).await.unwrap(),
        UseVerdict::Replayed(OneTimeKind::SingleUse)
    );
    // B holds tok_2 as live in memory; A revokes it: B's commit refuses it at once, without
    // waiting for the notification.
    assert!(!b.is_token_revoked("tok_2").await.unwrap());
    a.revoke_token("tok_2", &grant.id, 100, &ev("token.revoked"))
        .await
        .unwrap();
    let revoked = single_use_of(&grant, "tok_2", "p3", true);
    assert_eq!(
        b.record_use(revoked).await.unwrap(),
        UseVerdict::TokenRevoked
    );
}

/// A revocation and a commit of its token's request are ordered by the lock on the grant's row:
/// a commit that waits for a revocation's lock reads the revocation, and a revocation waits
/// for a commit that holds the lock. (Each side is played by a transaction held open here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_revocation_and_a_commit_of_its_token_are_ordered_by_the_grant_lock() {
    let fx = Fixture::postgres().await;
    let store = fx.open().await;
    let grant = with_grant(store.as_ref(), None).await;
    let pool = sqlx::PgPool::connect(&fx.url).await.unwrap();

    // What `revoke_token` does, not committed yet.
    let mut revoking = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM grants WHERE id = $1 FOR SHARE")
        .bind(&grant.id)
        .execute(&mut *revoking)
        .await
        .unwrap();
    sqlx::query("INSERT INTO revoked_tokens (jti, grant_id, expires_at) VALUES ('tok_1', $1, 100)")
        .bind(&grant.id)
        .execute(&mut *revoking)
        .await
        .unwrap();
    let request = RequestUse {
        token: Some("tok_1".into()),
        ..use_of(&grant, "p1", 10)
    };
    let commit = tokio::spawn({
        let store = store.clone();
        async move { store.record_use(request).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !commit.is_finished(),
        "the commit did not wait for the revocation's lock"
    );
    revoking.commit().await.unwrap();
    assert_eq!(commit.await.unwrap().unwrap(), UseVerdict::TokenRevoked);

    // A commit holding the grant's lock, as the writer's batch does.
    let mut committing = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM grants WHERE id = $1 FOR UPDATE")
        .bind(&grant.id)
        .execute(&mut *committing)
        .await
        .unwrap();
    let revoke = tokio::spawn({
        let (store, id) = (store.clone(), grant.id.clone());
        async move {
            store
                .revoke_token("tok_2", &id, 100, &ev("token.revoked"))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !revoke.is_finished(),
        "the revocation did not wait for the commit's lock"
    );
    committing.commit().await.unwrap();
    revoke.await.unwrap().unwrap();
    assert!(store.is_token_revoked("tok_2").await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// One owner per SQLite database; a reader that changes nothing.

/// A second store on a SQLite database fails at once, with what is wrong and what to do, until
/// the first is dropped (its writer finished, its lock released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_has_one_owner_at_a_time() {
    let fx = Fixture::sqlite().await;
    let path = fx.url.trim_start_matches("sqlite://").to_owned();
    let first = fx.open().await;
    let grant = with_grant(first.as_ref(), None).await;
    let refused = crate::open(&fx.url).await.unwrap_err();
    assert!(matches!(refused, StoreError::InUse { .. }), "{refused:?}");
    let message = refused.to_string();
    let expected = format!(
        "database {path} is in use by another Leash server (lock file {path}.lock); stop it \
         first, or use PostgreSQL for several nodes"
    );
    assert_eq!(message, expected);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(format!("{path}.lock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the lock file is the owner's only");
    }
    // The first goes on serving, through any of its handles.
    let handle = first.clone();
    assert_eq!(
        handle.record_use(use_of(&grant, "p1", 10)).await.unwrap(),
        UseVerdict::Recorded
    );
    drop(handle);
    assert!(matches!(
        crate::open(&fx.url).await,
        Err(StoreError::InUse { .. })
    ));
    drop(first);
    let second = fx.open().await;
    assert_eq!(
        second.record_use(use_of(&grant, "p1", 10)).await.unwrap(),
        UseVerdict::Replayed(OneTimeKind::Proof),
        "the new owner knows what the old one consumed"
    );
}

/// What the chain and the outbox hold, read from outside the store: (events, head hash,
/// outbox rows).
async fn chain_at_rest(fx: &Fixture) -> (i64, Option<String>, Vec<(i64, String)>) {
    const COUNT: &str = "SELECT count(*) FROM audit_events";
    const HEAD: &str = "SELECT hash FROM audit_events ORDER BY seq DESC LIMIT 1";
    const OUTBOX: &str = "SELECT id, event FROM audit_outbox ORDER BY id";
    if fx.postgres.is_some() {
        let pool = sqlx::PgPool::connect(&fx.url).await.unwrap();
        let count = sqlx::query_scalar(COUNT).fetch_one(&pool).await.unwrap();
        let head = sqlx::query_scalar(HEAD)
            .fetch_optional(&pool)
            .await
            .unwrap();
        let outbox = sqlx::query_as(OUTBOX).fetch_all(&pool).await.unwrap();
        pool.close().await;
        return (count, head, outbox);
    }
    use rusqlite::OptionalExtension as _;
    let conn = rusqlite::Connection::open_with_flags(
        fx.url.trim_start_matches("sqlite://"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let count = conn.query_row(COUNT, [], |row| row.get(0)).unwrap();
    let head = conn
        .query_row(HEAD, [], |row| row.get(0))
        .optional()
        .unwrap();
    let outbox = conn
        .prepare(OUTBOX)
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    (count, head, outbox)
}

both_backends! {
    /// The audit reader beside a live store reads the chain as stored and changes nothing: no
    /// event is appended, the head stays, and an event left in the outbox stays there (the
    /// full store would move it into the chain at open: a second appender).
    async fn the_audit_reader_beside_a_live_store_changes_nothing(fx) {
        let store = fx.open().await;
        store.set_checkpoint_signer(sign_with_test_key());
        let grant = with_grant(store.as_ref(), None).await;
        store.append_audit(event(1)).await.unwrap();
        store.checkpoint_now().await.unwrap();
        // A change whose event could not join the chain: it waits in the outbox.
        fx.sabotage_audit(true).await;
        store.end_grant(&grant.id, GrantEnd::Completed, None, 11, &ev("grant.completed")).await.unwrap().unwrap();
        fx.sabotage_audit(false).await;
        let before = chain_at_rest(&fx).await;
        assert_eq!((before.0, before.2.len()), (4, 1), "{before:?}");

        let reader = crate::open_audit_reader(&fx.url).await.unwrap();
        assert_eq!(reader.setting("nothing").await.unwrap(), None);
        let everything = AuditQuery { limit: u32::MAX, ..AuditQuery::default() };
        assert_eq!(reader.audit_lines(&everything).await.unwrap(), store.audit_lines(&everything).await.unwrap());
        assert_eq!(reader.checkpoints(0).await.unwrap(), store.checkpoints(0).await.unwrap());
        assert_eq!(reader.checkpoints(0).await.unwrap().len(), 1);
        drop(reader);
        assert_eq!(chain_at_rest(&fx).await, before, "the reader changed the database");

        // The store goes on as before: the next change moves the waiting event, then its own.
        store.revoke_token("tok_1", &grant.id, 100, &ev("token.revoked")).await.unwrap();
        assert_eq!(kinds(store.as_ref()).await[4..], ["grant.completed", "token.revoked"]);
        assert_eq!(verify_stored(store.as_ref()).await, 6);
    }
}

both_backends! {
    /// A database without Leash's tables (a wrong URL) is named as such; a missing SQLite file
    /// is not created.
    async fn the_audit_reader_refuses_a_database_without_leash_schema(fx) {
        let refused = crate::open_audit_reader(&fx.url).await.unwrap_err();
        assert!(matches!(refused, StoreError::NotLeash(_)), "{refused:?}");
        if fx.postgres.is_none() {
            let path = fx.url.trim_start_matches("sqlite://");
            assert!(!std::path::Path::new(path).exists(), "the reader created the file");
            assert!(refused.to_string().starts_with("no database file at"), "{refused}");
            rusqlite::Connection::open(path).unwrap().execute_batch("CREATE TABLE other (x)").unwrap();
            let refused = crate::open_audit_reader(&fx.url).await.unwrap_err();
            assert!(matches!(refused, StoreError::NotLeash(_)), "{refused:?}");
        }
        let message = refused.to_string();
        assert!(message.contains("has no Leash schema") || message.contains("no database file"), "{message}");
    }
}

fn person(id: &str, name: &str) -> User {
    User {
        id: id.into(),
        name: name.into(),
        created_at: 1,
        disabled: false,
    }
}

both_backends! {
    async fn an_oidc_human_is_found_by_issuer_and_subject_never_by_name(fx) {
        let store = fx.open().await;
        let key = SecretDigest::from_stored("unused".into());
        store
            .create_user(&person("usr_k", "alice@example.com"), &SecretDigest::from_stored("k".into()), &ev("user.created"))
            .await
            .unwrap();
        // A name already taken is made unique; who the human is comes from (iss, sub).
        let first = store
            .oidc_user("https://idp", "sub-1", &person("usr_a", "alice@example.com"), &key, &ev("user.created"))
            .await
            .unwrap();
        assert_eq!(first.id, "usr_a");
        assert_eq!(first.name, "alice@example.com (usr_a)");
        let again = store
            .oidc_user("https://idp", "sub-1", &person("usr_b", "other"), &SecretDigest::from_stored("k2".into()), &ev("user.created"))
            .await
            .unwrap();
        assert_eq!(again, first);
        // The same subject at another issuer is another human.
        let elsewhere = store
            .oidc_user("https://other-idp", "sub-1", &person("usr_c", "carol"), &SecretDigest::from_stored("k3".into()), &ev("user.created"))
            .await
            .unwrap();
        assert_eq!(elsewhere.id, "usr_c");
        assert_eq!(store.list_users().await.unwrap().len(), 3);
    }
}

both_backends! {
    async fn sessions_end_at_logout_and_when_their_human_is_disabled(fx) {
        let store = fx.open().await;
        let grant = with_grant(store.as_ref(), None).await;
        let user = store.user_by_key(&SecretDigest::from_stored("d1".into())).await.unwrap().unwrap();
        let session = Session { user: user.clone(), admin: true, created_at: 10, last_seen: 10, expires_at: 100 };
        let (one, two) = (SecretDigest::of("session-1"), SecretDigest::of("session-2"));
        store.create_session(&one, &session, &ev("session.login")).await.unwrap();
        store.create_session(&two, &session, &ev("session.login")).await.unwrap();
        assert_eq!(store.session(&one).await.unwrap(), Some(session.clone()));
        assert_eq!(store.session(&SecretDigest::of("session-3")).await.unwrap(), None);
        store.touch_session(&one, 50).await.unwrap();
        // A touch never moves last_seen back.
        store.touch_session(&one, 20).await.unwrap();
        assert_eq!(store.session(&one).await.unwrap().unwrap().last_seen, 50);
        assert!(store.end_session(&one, &ev("session.logout")).await.unwrap());
        assert!(!store.end_session(&one, &ev("session.logout")).await.unwrap());
        assert_eq!(store.session(&one).await.unwrap(), None);

        assert!(store.disable_user(&user.id, 60, &ev("user.disabled")).await.unwrap());
        assert!(!store.disable_user("usr_nobody", 60, &ev("user.disabled")).await.unwrap());
        assert_eq!(store.session(&two).await.unwrap(), None);
        assert_eq!(store.user_by_key(&SecretDigest::from_stored("d1".into())).await.unwrap(), None);
        assert!(store.list_users().await.unwrap()[0].disabled);
        assert_eq!(store.live_grant(&grant.id).await.unwrap().unwrap().status, GrantStatus::Revoked);
    }
}

both_backends! {
    async fn a_login_is_taken_once_and_expired_ones_are_pruned(fx) {
        let store = fx.open().await;
        let login = Login {
            state: "s".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            return_to: "/console".into(),
            expires_at: 100,
        };
        let (live, old) = (SecretDigest::of("login-1"), SecretDigest::of("login-2"));
        store.create_login(&live, &login).await.unwrap();
        store.create_login(&old, &Login { expires_at: 5, ..login.clone() }).await.unwrap();
        assert_eq!(store.take_login(&live).await.unwrap(), Some(login));
        assert_eq!(store.take_login(&live).await.unwrap(), None);
        assert!(store.prune(10).await.unwrap() >= 1);
        assert_eq!(store.take_login(&old).await.unwrap(), None);
    }
}
