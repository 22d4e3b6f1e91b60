//! Leash's HTTP server: the axum router, authentication extractors, handlers, and the one
//! error-to-HTTP mapping. [`run`] is what `leash serve` calls.

pub mod api;
pub mod approvals;
pub mod audit;
pub mod authorize;
pub mod backup;
pub mod bootstrap;
pub mod config;
pub mod connections;
pub mod console;
pub mod error;
pub mod extract;
pub mod files;
pub mod gateway;
pub mod keys;
pub mod limits;
pub mod listener;
pub mod master;
pub mod mcp;
pub mod meta;
pub mod metrics;
pub mod notify;
pub mod oauth;
pub mod oidc;
pub mod openapi;
pub mod overrides;
pub mod proxy;
pub mod reflection;
pub mod review;
pub mod state;
pub mod upstream_client;
pub mod vault;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get};
use leash_core::Clock;
use leash_core::secret::Secret;
use tokio::net::TcpListener;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use config::{Config, Flags};
pub use state::AppState;

use crate::error::ApiError;

/// The documented routes, each registered together with its `#[utoipa::path]` description.
fn documented() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(meta::healthz))
        .routes(routes!(meta::readyz))
        .routes(routes!(meta::metrics))
        .routes(routes!(meta::metadata))
        .routes(routes!(meta::jwks))
        .routes(routes!(meta::delegation_jwks))
        .routes(routes!(keys::rotate))
        .routes(routes!(keys::list))
        .routes(routes!(master::rotate_online))
        .routes(routes!(proxy::ca_pem))
        .routes(routes!(backup::backup))
        .routes(routes!(oauth::token))
        .routes(routes!(oauth::revoke))
        .routes(routes!(oauth::introspect))
        .routes(routes!(api::create_user, api::list_users))
        .routes(routes!(api::disable_user))
        .routes(routes!(api::me))
        .routes(routes!(api::create_agent, api::list_agents))
        .routes(routes!(api::get_agent))
        .routes(routes!(api::disable_agent))
        .routes(routes!(api::create_grant, api::list_grants))
        .routes(routes!(api::get_grant))
        .routes(routes!(api::revoke_grant))
        .routes(routes!(api::complete_grant))
        .routes(routes!(api::list_upstreams))
        .routes(routes!(approvals::list))
        .routes(routes!(approvals::get))
        .routes(routes!(approvals::approve))
        .routes(routes!(approvals::deny))
        .routes(routes!(approvals::body))
        .routes(routes!(audit::list))
        .routes(routes!(audit::checkpoints, audit::checkpoint_now))
        .routes(routes!(review::review))
        .routes(routes!(vault::list))
        .routes(routes!(vault::put, vault::delete))
        .routes(routes!(connections::connect))
        .routes(routes!(connections::callback))
        .routes(routes!(authorize::authorize))
}

/// The full router over a prepared state; `GET /openapi.json` serves the description of its
/// documented routes.
pub fn router(state: Arc<AppState>) -> Router {
    let (documented, description) = documented().split_for_parts();
    let description = axum::body::Bytes::from(description.to_json().unwrap_or_default());
    documented
        .route(
            "/openapi.json",
            get(move || {
                let description = description.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        description,
                    )
                }
            }),
        )
        .route(
            "/mcp/{upstream}",
            axum::routing::post(mcp::handle)
                .get(mcp::handle)
                .delete(mcp::handle),
        )
        .route(
            "/.well-known/oauth-protected-resource/mcp/{upstream}",
            axum::routing::get(mcp::resource_metadata),
        )
        .route("/login", get(oidc::login))
        .route("/auth/callback", get(oidc::callback))
        .route("/logout", axum::routing::post(oidc::logout))
        .route("/console", get(console::index))
        .route("/console/", get(console::index))
        .route("/console/assets/app.js", get(console::script))
        .route("/console/assets/app.css", get(console::style))
        .route("/gw/{upstream}", any(gateway::handle))
        .route("/gw/{upstream}/{*path}", any(gateway::handle))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            listener::front_door,
        ))
        .with_state(state)
}

/// What the server tells its starter once it listens.
#[derive(Debug)]
pub struct Started {
    /// The bound address.
    pub addr: std::net::SocketAddr,
    /// The forward proxy's bound address, if `[proxy]` is configured.
    pub proxy_addr: Option<std::net::SocketAddr>,
    /// The issuer URL.
    pub issuer: String,
    /// The admin key, when generated by this start.
    pub generated_admin_key: Option<Secret>,
}

/// Secrets from the environment that `serve` needs.
#[derive(Debug, Default)]
pub struct Secrets {
    /// `LEASH_ADMIN_TOKEN`.
    pub admin_token: Option<Secret>,
    /// `LEASH_MASTER_KEY` (base64).
    pub master_key: Option<String>,
}

/// Starts Leash: data directory, store, keys, listener; serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    secrets: Secrets,
    clock: Arc<dyn Clock>,
    on_start: impl FnOnce(&Started),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        anyhow::anyhow!("cannot create data dir {}: {e}", config.data_dir.display())
    })?;
    let from_file = secrets.master_key.is_none();
    let master = bootstrap::load_master_key(secrets.master_key, &config.data_dir)?;
    let store = leash_store::open(&config.database).await.map_err(|e| {
        let url = leash_store::display_url(&config.database);
        anyhow::anyhow!("cannot open database {url}: {e}")
    })?;
    let master = if from_file {
        master::settle(store.as_ref(), &config.data_dir, master).await?
    } else {
        master
    };
    let socket = listener::listen(config.listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = socket.local_addr()?;
    if config.proxy.is_none() && !config.proxy_hosts().is_empty() {
        tracing::warn!(
            "upstreams have `hosts`, but no [proxy] is configured: no browser reaches them"
        );
    }
    let proxy_socket = match &config.proxy {
        Some(proxy) => Some(listener::listen(proxy.listen).map_err(|e| {
            anyhow::anyhow!("cannot listen on {} for the proxy: {e}", proxy.listen)
        })?),
        None => None,
    };
    let proxy_addr = proxy_socket
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let issuer = config
        .issuer
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let boot = bootstrap::prepare(
        config,
        issuer.clone(),
        store.clone(),
        clock.clone(),
        master,
        from_file,
        secrets.admin_token,
    )
    .await?;
    on_start(&Started {
        addr,
        proxy_addr,
        issuer,
        generated_admin_key: boot.generated_admin_key,
    });

    #[cfg(unix)]
    let reloader = {
        let state = boot.state.clone();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                match state.reload_policy() {
                    Ok(count) => tracing::info!(operator_policies = count, "policies reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "policy reload failed; the previous policies stay in force")
                    }
                }
            }
        })
    };
    let checkpoints = tokio::spawn(audit::checkpoint_timer(store.clone()));
    let key_watch = tokio::spawn(keys::watch(boot.state.clone()));
    let key_schedule = boot
        .state
        .config
        .rotate_keys_every
        .map(|every| tokio::spawn(keys::schedule(boot.state.clone(), every)));
    let rates = boot.state.clone();
    let pruner = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = store.prune(clock.now()).await {
                tracing::warn!(error = %e, "pruning replay entries failed");
            }
            rates.token_rates.forget_idle();
            rates.gateway_rates.forget_idle();
            rates.unauthenticated.forget_idle();
            audit::record_refusal_summary(&rates).await;
        }
    });
    let limits = boot.state.config.limits.clone();
    let state = boot.state.clone();
    // One shutdown for both listeners.
    let stopping = tokio_util::sync::CancellationToken::new();
    let proxy = proxy_socket.map(|socket| {
        let stopped = stopping.clone().cancelled_owned();
        tokio::spawn(proxy::front::serve(boot.state.clone(), socket, stopped))
    });
    let stop = stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    listener::serve(
        socket,
        router(boot.state),
        &limits,
        stopping.cancelled_owned(),
    )
    .await;
    if let Some(proxy) = proxy {
        let _ = proxy.await;
    }
    pruner.abort();
    // What the minute had counted so far is not lost with the process.
    audit::record_refusal_summary(&state).await;
    checkpoints.abort();
    key_watch.abort();
    if let Some(schedule) = key_schedule {
        schedule.abort();
    }
    #[cfg(unix)]
    reloader.abort();
    Ok(())
}
