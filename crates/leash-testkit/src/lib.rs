//! Test harness: the real `leash` binary on a random loopback port with a temporary store —
//! a SQLite file, or with `LEASH_TEST_BACKEND=postgres` a fresh PostgreSQL database (so the one
//! suite runs on both backends) — plus helpers that play the admin, a human and an agent over
//! real HTTP.

#![allow(
    clippy::expect_used,
    reason = "test harness: a broken setup should abort the test loudly"
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// The admin key every test server starts with.
pub const ADMIN_KEY: &str = "lsk_test_admin_key_0123456789abcdefghijklmnop";
pub use leash_core::assertion::JWT_BEARER;
pub use leash_core::token::{GRANT_TOKEN_TYPE, TOKEN_EXCHANGE};
/// The default test agent.
pub const AGENT: &str = "spiffe://example.org/agent/mailbot";

/// The rate limits of test servers, unless a test sets its own `[limits]`: off, because the
/// suites and load benchmarks drive one agent far faster than a real one works.
pub const UNLIMITED: &str =
    "[limits]\ntoken_rate = 0\ngateway_rate = 0\nunauthenticated_rate = 0\n";

/// The key of the test proxy that may call `/v1/authorize` (see [`proxy_key_config`]).
pub const PROXY_KEY: &str = "lpk_test_proxy_0123456789abcdef0123456789abcdef";

/// The config lines that let the holder of [`PROXY_KEY`] call `/v1/authorize`: its SHA-256,
/// as an operator writes it.
pub fn proxy_key_config() -> String {
    let digest = leash_core::secret::SecretDigest::of(PROXY_KEY);
    format!("[authorize]\nproxy_keys = [\"{}\"]\n", digest.as_str())
}

/// Upstreams every test server knows.
pub const UPSTREAMS: &str = r#"
[[upstream]]
name = "mail"
url = "http://127.0.0.1:9"
[[upstream.route]]
method = "GET"
path = "/messages/**"
action = "mail:read"
[[upstream.route]]
method = "POST"
path = "/drafts"
action = "mail:draft"
[[upstream.route]]
method = "POST"
path = "/messages/*/send"
action = "mail:send"
risk = "high"
[[upstream.route]]
method = "GET"
path = "/export"
action = "mail:export"

[[upstream]]
name = "finance"
url = "http://127.0.0.1:9"
[[upstream.route]]
method = "GET"
path = "/**"
action = "finance:read"
"#;

/// The current Unix time.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Waits until the wall clock reaches the second `unix`, and a little past it. Leash's times are
/// whole seconds and what expires at `unix` is refused from that second on, so a test of
/// expiry waits exactly as long as it must, not a fixed sleep covering the worst case.
pub async fn wait_until(unix: i64) {
    let due = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0))
        + std::time::Duration::from_millis(20);
    if let Ok(left) = due.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

/// The Unix time of an RFC 3339 time as the API writes it (`expires_at` and the like).
pub fn unix_of(rfc3339: &Value) -> i64 {
    let text = rfc3339.as_str().expect("an RFC 3339 time");
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 time")
        .unix_timestamp()
}

/// The `exp` claim of a JWT, read without checking its signature (the test's own token).
pub fn jwt_exp(token: &str) -> i64 {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
        .expect("base64url payload");
    let claims: Value = serde_json::from_slice(&bytes).expect("JSON claims");
    claims["exp"].as_i64().expect("exp")
}

/// Selects the integration tests' backend: `postgres`, or SQLite when unset.
pub const ENV_TEST_BACKEND: &str = "LEASH_TEST_BACKEND";
/// The PostgreSQL server the tests create their databases on.
pub const ENV_TEST_POSTGRES: &str = "LEASH_TEST_POSTGRES";
const DEFAULT_TEST_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Whether this run's servers store in PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var(ENV_TEST_BACKEND).is_ok_and(|v| v == "postgres")
}

/// A fresh PostgreSQL database, dropped with its guard.
pub struct TestDatabase {
    /// `postgres://…/leash_it_…`.
    pub url: String,
    server: String,
    name: String,
}

impl TestDatabase {
    /// Cuts every connection to the database and refuses new ones (`false`), or lets them in
    /// again (`true`): to Leash this is the database server going down and coming back.
    pub async fn allow_connections(&self, allow: bool) {
        use sqlx::Connection as _;
        let mut admin = sqlx::PgConnection::connect(&self.server)
            .await
            .expect("connect to the test server");
        sqlx::query(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
            self.name
        ))
        .execute(&mut admin)
        .await
        .expect("alter database");
        if !allow {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&self.name)
            .execute(&mut admin)
            .await
            .expect("terminate connections");
        }
    }

    /// Runs SQL in the database as the superuser (bypassing Leash).
    pub async fn execute(&self, sql: &str) {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connect");
        sqlx::raw_sql(sql).execute(&mut conn).await.expect("sql");
    }

    /// Creates one on the test server. No server is a failure, never a skip.
    pub async fn create() -> Self {
        let server =
            std::env::var(ENV_TEST_POSTGRES).unwrap_or_else(|_| DEFAULT_TEST_POSTGRES.to_owned());
        Self::create_on(&server).await
    }

    /// Creates one on the server at `server` (a superuser URL).
    pub async fn create_on(server: &str) -> Self {
        use sqlx::Connection as _;
        let server = server.to_owned();
        let mut admin = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the PostgreSQL tests need a server at {server} ({ENV_TEST_POSTGRES}); \
                     `bash .ci/postgres.sh` installs and starts one: {e}"
                )
            });
        let name = format!("leash_it_{}", hex::encode(rand::random::<[u8; 8]>()));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create database");
        let mut url = url::Url::parse(&server).expect("LEASH_TEST_POSTGRES is a URL");
        url.set_path(&name);
        Self {
            url: url.to_string(),
            server,
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop may run inside a runtime, which cannot be blocked on: a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                use sqlx::Connection as _;
                if let Ok(mut admin) = sqlx::PgConnection::connect(&server).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A PostgreSQL server of the test's own (initdb in a temp dir, on a free loopback port), for
/// tests that stop and start the database server itself. Needs the server binaries
/// (`/usr/lib/postgresql/<version>/bin`, which `bash .ci/postgres.sh` installs); as root it runs
/// them as the `postgres` user, which PostgreSQL requires.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// Creates and starts it (blocking: a few hundred milliseconds).
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries in /usr/lib/postgresql (bash .ci/postgres.sh)")
            .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max_by_key(|bin| {
                bin.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .expect("no initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let server = Self { dir, bin, port };
        if server.as_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(server.dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the data dir to postgres");
        }
        let data = server.dir.path().join("data");
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        server.up();
        server
    }

    fn as_root(&self) -> bool {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
    }

    /// One of the server's programs, run as `postgres` when we are root.
    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        if self.as_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            std::process::Command::new(&path)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .expect("run a PostgreSQL program");
        assert!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server and waits until it accepts connections (blocking).
    pub fn up(&self) {
        let dir = self.dir.path();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            dir.display()
        );
        let data = dir.join("data");
        let log = dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-o",
                &options,
                "-l",
                log.to_str().expect("utf-8 path"),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server (fast shutdown: every connection is cut; blocking).
    pub fn down(&self) {
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// The superuser URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        if let Some(data) = data.to_str() {
            let _ = self
                .command("pg_ctl")
                .args(["-D", data, "-m", "immediate", "stop"])
                .output();
        }
    }
}

/// A running `leash serve` child process.
pub struct Leash {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// Everything the server printed to stdout and stderr, for log assertions.
    pub output: std::sync::Arc<std::sync::Mutex<String>>,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    http: reqwest::Client,
    listen: String,
    log_level: &'static str,
    /// The PostgreSQL database, when the run is on PostgreSQL or the server is a cluster node
    /// (after `child`: dropped last).
    database: Option<std::sync::Arc<TestDatabase>>,
    /// The base URL in tokens and proofs: the server's own, or a cluster's shared issuer.
    public: Option<String>,
    /// The vault master key every node of a cluster shares.
    master_key: Option<String>,
}

/// The issuer and public URL every node of a test cluster shares (what a load balancer in
/// front of them would be called); requests still go to each node's own address.
pub const CLUSTER_URL: &str = "http://leash.cluster.test";

/// Warnings, and the debug line of each restart of SQLite's write-ahead log.
const QUIET_WITH_LOG_RESTARTS: &str = "warn,leash_store::wal=debug";

impl Leash {
    /// Starts the binary at `bin` with the test upstreams and `extra` config lines.
    pub async fn start(bin: &Path, extra: &str) -> Self {
        Self::start_with_upstream(bin, extra, "http://127.0.0.1:9").await
    }

    /// The same, with every test upstream pointing at `upstream_url`.
    pub async fn start_with_upstream(bin: &Path, extra: &str, upstream_url: &str) -> Self {
        Self::launch(bin, extra, upstream_url, "info").await
    }

    /// The same, logging warnings only (for load runs, where a line per request would be
    /// measured too and kept in memory by this harness), and each restart of SQLite's log
    /// (about one a second under load), whose pause every waiting request sits through.
    pub async fn start_quiet(bin: &Path, extra: &str, upstream_url: &str) -> Self {
        Self::launch(bin, extra, upstream_url, QUIET_WITH_LOG_RESTARTS).await
    }

    /// Quiet, on the backend named (not the run's): for benchmarks that compare the two.
    pub async fn start_quiet_on(
        bin: &Path,
        extra: &str,
        upstream_url: &str,
        postgres: bool,
    ) -> Self {
        Self::launch_on(bin, extra, upstream_url, "warn", postgres).await
    }

    async fn launch(bin: &Path, extra: &str, upstream_url: &str, log_level: &'static str) -> Self {
        Self::launch_on(bin, extra, upstream_url, log_level, on_postgres()).await
    }

    async fn launch_on(
        bin: &Path,
        extra: &str,
        upstream_url: &str,
        log_level: &'static str,
        postgres: bool,
    ) -> Self {
        let upstreams = UPSTREAMS.replace("http://127.0.0.1:9", upstream_url);
        let limits = if extra.contains("[limits]") {
            ""
        } else {
            UNLIMITED
        };
        let database = if postgres {
            Some(std::sync::Arc::new(TestDatabase::create().await))
        } else {
            None
        };
        let config = format!("{extra}\n{upstreams}\n{limits}");
        let mut leash = Self::prepare(bin, &config, log_level, database);
        leash.spawn().await;
        leash
    }

    /// A server not started yet, with its config file written.
    fn prepare(
        bin: &Path,
        config: &str,
        log_level: &'static str,
        database: Option<std::sync::Arc<TestDatabase>>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("leash.toml"), config).expect("config");
        Self {
            url: String::new(),
            output: Default::default(),
            bin: bin.to_owned(),
            dir,
            child: None,
            http: reqwest::Client::new(),
            listen: "127.0.0.1:0".into(),
            log_level,
            database,
            public: None,
            master_key: None,
        }
    }

    /// Starts `nodes` servers on one fresh PostgreSQL database, with one master key and one
    /// issuer ([`CLUSTER_URL`]): a cluster as the README describes it.
    pub async fn start_cluster(bin: &Path, nodes: usize, upstream_url: &str) -> Vec<Self> {
        Self::start_cluster_on(bin, nodes, upstream_url, TestDatabase::create().await).await
    }

    /// [`Leash::start_cluster`] with `extra` config lines on every node.
    pub async fn start_cluster_with(
        bin: &Path,
        nodes: usize,
        upstream_url: &str,
        extra: &str,
    ) -> Vec<Self> {
        let database = TestDatabase::create().await;
        Self::start_cluster_of(bin, nodes, upstream_url, database, extra).await
    }

    /// The same on a database of choice (of a [`PrivatePostgres`], say).
    pub async fn start_cluster_on(
        bin: &Path,
        nodes: usize,
        upstream_url: &str,
        database: TestDatabase,
    ) -> Vec<Self> {
        Self::start_cluster_of(bin, nodes, upstream_url, database, "").await
    }

    async fn start_cluster_of(
        bin: &Path,
        nodes: usize,
        upstream_url: &str,
        database: TestDatabase,
        extra: &str,
    ) -> Vec<Self> {
        use base64::Engine as _;
        let database = std::sync::Arc::new(database);
        let master_key =
            base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
        let upstreams = UPSTREAMS.replace("http://127.0.0.1:9", upstream_url);
        let config = format!("issuer = \"{CLUSTER_URL}\"\n{extra}\n{upstreams}\n{UNLIMITED}");
        let mut cluster = Vec::new();
        for _ in 0..nodes {
            let mut node = Self::prepare(bin, &config, "warn", Some(database.clone()));
            node.public = Some(CLUSTER_URL.to_owned());
            node.master_key = Some(master_key.clone());
            node.spawn().await;
            cluster.push(node);
        }
        cluster
    }

    /// The vault master key a cluster's nodes share.
    pub fn master_key(&self) -> Option<&str> {
        self.master_key.as_deref()
    }

    /// The database as the PostgreSQL superuser sees it, to simulate an outage.
    pub fn test_database(&self) -> Option<&TestDatabase> {
        self.database.as_deref()
    }

    /// The base URL tokens and proofs name (`htu`, assertion `aud`).
    pub fn public_url(&self) -> &str {
        self.public.as_deref().unwrap_or(&self.url)
    }

    async fn spawn(&mut self) {
        let mut command = Command::new(&self.bin);
        if let Some(key) = &self.master_key {
            command.env("LEASH_MASTER_KEY", key);
        } else {
            command.env_remove("LEASH_MASTER_KEY");
        }
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("leash.toml"))
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--database")
            .arg(self.database_url())
            .arg("--listen")
            .arg(&self.listen)
            .env("LEASH_ADMIN_TOKEN", ADMIN_KEY)
            .env("LEASH_LOG", self.log_level)
            .env_remove("LEASH_ISSUER")
            .env_remove("LEASH_DATABASE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn leash");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let output = self.output.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("leash listening on ")
                    && let Some(tx) = tx.take()
                {
                    let addr = rest.split(' ').next().unwrap_or_default().to_owned();
                    let _ = tx.send(addr);
                }
                output
                    .lock()
                    .expect("log lock")
                    .push_str(&format!("{line}\n"));
            }
        });
        let output = self.output.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                output
                    .lock()
                    .expect("log lock")
                    .push_str(&format!("{line}\n"));
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap_or_else(|_| {
                panic!("leash did not start: {}", self.output.lock().expect("lock"))
            })
            .expect("listening line");
        self.listen = addr.clone();
        self.url = format!("http://{addr}");
        self.child = Some(child);
    }

    /// The forward proxy's address (`[proxy] listen`) as this start printed it, once printed.
    pub async fn proxy_addr(&self) -> String {
        for _ in 0..100 {
            let output = self.output.lock().expect("lock").clone();
            if let Some(line) = output
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("leash proxy listening on "))
            {
                return line.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "the proxy did not listen: {}",
            self.output.lock().expect("lock")
        )
    }

    /// The directory holding the config file (a place for policy files).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// The server's process id (for a profiler to attach to).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).expect("running")
    }

    /// Sends SIGHUP (reload policies).
    pub async fn hangup(&self) {
        let pid = self.pid();
        Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .await
            .expect("kill -HUP");
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The store's database URL.
    pub fn database_url(&self) -> String {
        match &self.database {
            Some(database) => database.url.clone(),
            None => format!("sqlite://{}", self.data_dir().join("leash.db").display()),
        }
    }

    /// Whether this server stores in PostgreSQL.
    pub fn on_postgres(&self) -> bool {
        self.database.is_some()
    }

    /// Runs SQL on the server's database from outside the server (as an operator or a failing
    /// disk would): `sqlite` or `postgres`, whichever the server is on.
    pub async fn sql(&self, sqlite: &str, postgres: &str) {
        match &self.database {
            Some(database) => database.execute(postgres).await,
            None => rusqlite::Connection::open(self.data_dir().join("leash.db"))
                .expect("open")
                .execute_batch(sqlite)
                .expect("sql"),
        }
    }

    /// How many rows `table` holds, read from outside the server.
    pub async fn count_rows(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match &self.database {
            Some(database) => {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(&database.url)
                    .await
                    .expect("connect");
                sqlx::query_scalar(&sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect("query")
            }
            None => rusqlite::Connection::open(self.data_dir().join("leash.db"))
                .expect("open")
                .query_row(&sql, [], |row| row.get(0))
                .expect("query"),
        }
    }

    /// Reads one byte column of one row from outside the server, with SQL both backends take.
    pub async fn query_bytes(&self, sql: &str) -> Vec<u8> {
        match &self.database {
            Some(database) => {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect(&database.url)
                    .await
                    .expect("connect");
                sqlx::query_scalar(sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect("query")
            }
            None => rusqlite::Connection::open(self.data_dir().join("leash.db"))
                .expect("open")
                .query_row(sql, [], |row| row.get(0))
                .expect("query"),
        }
    }

    /// Locks `table` from outside the server, as a migration or a stuck session would, until
    /// the lock is released: every statement touching it waits. PostgreSQL only (`None` on
    /// SQLite, whose readers cannot be held up from outside while the server keeps the file
    /// open).
    pub async fn lock_table(&self, table: &str) -> Option<TableLock> {
        use sqlx::Connection as _;
        let url = &self.database.as_ref()?.url;
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query("BEGIN")
            .execute(&mut conn)
            .await
            .expect("begin");
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut conn)
            .await
            .expect("lock");
        Some(TableLock {
            conn,
            url: url.clone(),
        })
    }

    /// Makes every insert into `table` fail from outside the server (as a full or broken disk
    /// would), or, with `fail` false, undoes it; on either backend.
    pub async fn fail_inserts(&self, table: &str, fail: bool) {
        if fail {
            self.sql(
                &format!(
                    "CREATE TRIGGER sabotage BEFORE INSERT ON {table} \
                     BEGIN SELECT RAISE(ABORT, 'disk full'); END;"
                ),
                &format!(
                    "CREATE OR REPLACE FUNCTION sabotage() RETURNS trigger LANGUAGE plpgsql AS \
                     $$ BEGIN RAISE EXCEPTION 'disk full'; END $$; \
                     CREATE TRIGGER sabotage BEFORE INSERT ON {table} \
                     FOR EACH ROW EXECUTE FUNCTION sabotage();"
                ),
            )
            .await;
        } else {
            self.sql(
                "DROP TRIGGER sabotage",
                &format!("DROP TRIGGER sabotage ON {table}"),
            )
            .await;
        }
    }

    /// Everything the store holds at rest, to search for secrets: the SQLite files' bytes, or
    /// every PostgreSQL row as text with its byte columns also decoded.
    pub async fn stored_bytes(&self) -> Vec<u8> {
        let Some(database) = &self.database else {
            let mut bytes = std::fs::read(self.data_dir().join("leash.db")).expect("db file");
            bytes.extend(std::fs::read(self.data_dir().join("leash.db-wal")).unwrap_or_default());
            return bytes;
        };
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&database.url)
            .await
            .expect("connect");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::TEXT FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_all(&mut conn)
        .await
        .expect("tables");
        let mut bytes = Vec::new();
        for table in tables {
            let rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT row_to_json(t)::TEXT FROM {table} t"))
                    .fetch_all(&mut conn)
                    .await
                    .expect("rows");
            for row in rows {
                bytes.extend(row.as_bytes());
                // Byte columns appear as "\\x<hex>": add them decoded too.
                for hex_run in row.split("\\\\x").skip(1) {
                    let digits: String = hex_run
                        .chars()
                        .take_while(char::is_ascii_hexdigit)
                        .collect();
                    bytes.extend(hex::decode(&digits[..digits.len() & !1]).unwrap_or_default());
                }
            }
        }
        bytes
    }

    /// The server process's resident memory, KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// One value of `/metrics` by its full series name (`name{labels}`).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in {text}"))
    }

    /// Kills the server with SIGKILL (no shutdown of any kind).
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill");
            child.wait().await.expect("wait");
        }
    }

    /// Stops the server with SIGTERM and returns its exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().expect("pid");
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await
            .expect("kill -TERM");
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("exits")
            .expect("wait")
    }

    /// Starts the server again, after `kill9` or `terminate`, on the same port and data.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is still running");
        self.spawn().await;
    }

    /// Starts the server again on the same port and data.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.spawn().await;
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    /// A plain HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `METHOD path` with a Bearer key and an optional JSON body; returns status and JSON.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, _, body) = read(request.send().await.expect("request")).await;
        (status, body)
    }

    /// Adds a human; returns (id, api key).
    pub async fn create_user(&self, name: &str) -> (String, String) {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/users",
                ADMIN_KEY,
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["id"].as_str().expect("id").into(),
            body["api_key"].as_str().expect("key").into(),
        )
    }

    /// Registers an agent with `key`'s public part.
    pub async fn register_agent(&self, id: &str, key: &AgentKey) {
        let body =
            json!({"id": id, "name": "test agent", "jwks": {"keys": [key.public().to_value()]}});
        let (status, body) = self
            .call(reqwest::Method::POST, "/v1/agents", ADMIN_KEY, Some(body))
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// Creates a grant as the human with `user_key`.
    pub async fn create_grant(&self, user_key: &str, body: Value) -> Value {
        let (status, body) = self
            .call(reqwest::Method::POST, "/v1/grants", user_key, Some(body))
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// The token endpoint URL as tokens and proofs name it.
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.public_url())
    }

    /// Posts a raw form body to `path` with extra headers.
    pub async fn post_form(
        &self,
        path: &str,
        body: String,
        headers: &[(&str, String)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        read(request.send().await.expect("request")).await
    }
}

/// Status, headers and body (JSON, or the text as a JSON string) of a response.
pub async fn read(response: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

/// Encodes form pairs.
pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    out.finish()
}

/// A table of the server's PostgreSQL database locked by [`Leash::lock_table`].
pub struct TableLock {
    conn: sqlx::PgConnection,
    url: String,
}

impl TableLock {
    /// How many sessions of the server's database wait for a lock with a statement containing
    /// `text`.
    pub async fn waiting(&self, text: &str) -> i64 {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connect");
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
             AND position($1 in query) > 0",
        )
        .bind(text)
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_activity")
    }

    /// Releases the lock.
    pub async fn release(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .expect("rollback");
    }
}

/// A human, an agent and one active grant on a running server.
pub struct Scenario {
    /// The human's id.
    pub user_id: String,
    /// The human's API key.
    pub user_key: String,
    /// The agent's key.
    pub agent_key: AgentKey,
    /// The grant as created (with its handle).
    pub grant: Value,
}

impl Scenario {
    /// alice delegates mail:read + mail:draft for 30 minutes to the mailbot agent (Ed25519).
    pub async fn new(leash: &Leash) -> Self {
        Self::with_grant(
            leash,
            Alg::EdDsa,
            json!({
                "agent": AGENT, "purpose": "Summarise my inbox", "upstreams": ["mail"],
                "actions": ["mail:read", "mail:draft"], "ttl_seconds": 1800,
            }),
        )
        .await
    }

    /// The same with an agent key of `alg` and a grant body of choice.
    pub async fn with_grant(leash: &Leash, alg: Alg, grant: Value) -> Self {
        let (user_id, user_key) = leash.create_user("alice").await;
        let agent_key = AgentKey::generate(alg);
        leash.register_agent(AGENT, &agent_key).await;
        let grant = leash.create_grant(&user_key, grant).await;
        Self {
            user_id,
            user_key,
            agent_key,
            grant,
        }
    }

    /// Stores the human's `credential` for `upstream` in the vault (through `leash`).
    pub async fn vault(&self, leash: &Leash, upstream: &str, credential: Value) {
        let path = format!("/v1/vault/{upstream}");
        let (status, body) = leash
            .call(
                reqwest::Method::PUT,
                &path,
                &self.user_key,
                Some(credential),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// The grant's handle.
    pub fn handle(&self) -> &str {
        self.grant["handle"].as_str().expect("handle")
    }

    /// The grant's id.
    pub fn grant_id(&self) -> &str {
        self.grant["id"].as_str().expect("id")
    }

    /// The token-exchange form for this grant, with a fresh assertion.
    pub fn exchange_form(&self, leash: &Leash) -> Vec<(String, String)> {
        vec![
            ("grant_type".into(), TOKEN_EXCHANGE.into()),
            ("subject_token".into(), self.handle().into()),
            ("subject_token_type".into(), GRANT_TOKEN_TYPE.into()),
            ("client_assertion_type".into(), JWT_BEARER.into()),
            (
                "client_assertion".into(),
                self.agent_key
                    .client_assertion(AGENT, &leash.token_url(), now()),
            ),
        ]
    }

    /// Exchanges with `form` and `proof` (None: no DPoP header).
    pub async fn exchange_raw(
        &self,
        leash: &Leash,
        form: &[(String, String)],
        proof: Option<String>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let headers: Vec<(&str, String)> = proof.into_iter().map(|p| ("DPoP", p)).collect();
        leash
            .post_form("/oauth2/token", crate::form(&pairs), &headers)
            .await
    }

    /// A successful exchange with a fresh DPoP key; returns (token, DPoP key).
    pub async fn token(&self, leash: &Leash) -> (String, AgentKey) {
        let dpop = AgentKey::generate(Alg::EdDsa);
        let proof = dpop.dpop_proof("POST", &leash.token_url(), None, None, now());
        let (status, _, body) = self
            .exchange_raw(leash, &self.exchange_form(leash), Some(proof))
            .await;
        assert_eq!(status, 200, "{body}");
        (
            body["access_token"].as_str().expect("token").to_owned(),
            dpop,
        )
    }

    /// Calls `POST /v1/grants/{id}/complete` as the agent (a resource-side DPoP call).
    pub async fn agent_call(
        &self,
        leash: &Leash,
        method: reqwest::Method,
        path: &str,
        authorization: &str,
        proof: Option<String>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = leash
            .http()
            .request(method, format!("{}{path}", leash.url))
            .header("Authorization", authorization);
        if let Some(proof) = proof {
            request = request.header("DPoP", proof);
        }
        read(request.send().await.expect("request")).await
    }

    /// The grant's status as its human sees it.
    pub async fn grant_status(&self, leash: &Leash) -> String {
        let path = format!("/v1/grants/{}", self.grant_id());
        let (status, grant) = leash
            .call(reqwest::Method::GET, &path, &self.user_key, None)
            .await;
        assert_eq!(status, 200, "{grant}");
        grant["status"].as_str().expect("status").to_owned()
    }

    /// Introspects `token` as admin.
    pub async fn introspect(&self, leash: &Leash, token: &str) -> Value {
        let (status, _, body) = leash
            .post_form(
                "/oauth2/introspect",
                form(&[("token", token)]),
                &[("Authorization", format!("Bearer {ADMIN_KEY}"))],
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// One request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path and query as received.
    pub target: String,
    /// Headers as received.
    pub headers: reqwest::header::HeaderMap,
    /// Body as received.
    pub body: Vec<u8>,
}

/// An upstream on loopback answering every request with `body`, on its own thread and
/// runtime: what the load benchmarks put behind the gateway. Returns its base URL.
pub fn fixed_upstream(body: &'static [u8]) -> String {
    serve_apart(axum::Router::new().fallback(move || async move { body }))
}

/// Serves `app` on a random loopback port from its own thread and runtime, so that a load
/// generator in the caller's runtime does not slow it (nor it the generator). Returns its base
/// URL. Its backlog is as long as the `leash` server's (`leash_server::listener::listen`): the
/// load bench's upstream and floor proxies must not drop the connects a burst opens when the
/// proxy they are compared with does not.
pub fn serve_apart(app: axum::Router) -> String {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind("127.0.0.1:0".parse().expect("address"))
                .expect("bind");
            let listener = socket.listen(4096).expect("listen");
            addr_tx
                .send(listener.local_addr().expect("addr"))
                .expect("caller waits");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    let addr = addr_rx.recv().expect("serving thread started");
    format!("http://{addr}")
}

/// An upstream on loopback that records every request and answers 200 with a JSON body, a
/// `Set-Cookie` (which the gateway must strip) and an `X-Upstream` header.
pub struct RecordingUpstream {
    /// Its base URL.
    pub url: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
}

/// The answer of a [`RecordingUpstream`] that reflects the request at an echo path (for the
/// gateway's reflection guard).
fn echo_of(target: &str, headers: &axum::http::HeaderMap) -> Option<axum::response::Response> {
    use axum::response::IntoResponse as _;
    let cookie = headers
        .get("cookie")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if target.ends_with("/echo-headers") {
        // Padding first, so the reflection comes in a later part of a longer answer.
        let mut page = "x".repeat(100_000);
        for (name, value) in headers {
            page.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        return Some(page.into_response());
    }
    if target.ends_with("/echo-cookie") {
        return Some(([("x-got-cookie", cookie)], "ok").into_response());
    }
    // The cookie's value as a header's name, in upper case in the body, or "compressed".
    let value = cookie
        .split_once('=')
        .map_or("", |(_, v)| v)
        .to_ascii_lowercase();
    if target.ends_with("/echo-name") {
        let name = axum::http::HeaderName::from_bytes(format!("x-{value}").as_bytes()).ok()?;
        return Some(([(name, "1")], "ok").into_response());
    }
    if target.ends_with("/echo-upper") {
        return Some(format!("you sent {}", cookie.to_uppercase()).into_response());
    }
    if target.ends_with("/echo-gzip") {
        return Some(
            ([("content-encoding", "gzip")], "\x1f\u{8b} stands for gzip").into_response(),
        );
    }
    None
}

impl RecordingUpstream {
    /// Starts it on a random loopback port.
    pub async fn start() -> Self {
        use axum::extract::Request;
        let requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>> = Default::default();
        let seen = requests.clone();
        use axum::response::IntoResponse as _;
        let app = axum::Router::new().fallback(move |request: Request| {
            let seen = seen.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, 16 << 20)
                    .await
                    .map(|b| b.to_vec())
                    .unwrap_or_default();
                let target = parts
                    .uri
                    .path_and_query()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                let size = body.len();
                // An upstream that reflects what it received (a debug page, a careless error
                // page): `/echo-headers` in the body, `/echo-cookie` in a header.
                let echo = echo_of(&target, &parts.headers);
                seen.lock().expect("lock").push(Recorded {
                    method: parts.method.to_string(),
                    target,
                    headers: parts.headers,
                    body,
                });
                if let Some(echo) = echo {
                    return echo;
                }
                (
                    [
                        ("set-cookie", "upstream_session=secret; Path=/"),
                        ("x-upstream", "yes"),
                        // An upstream posing as Leash: the gateway must strip this.
                        ("leash-decision", "approval_required"),
                    ],
                    axum::Json(json!({"ok": true, "received_bytes": size})),
                )
                    .into_response()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, requests }
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.requests.lock().expect("lock").len()
    }
}
