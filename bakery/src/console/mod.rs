//! The web console (`launcher console`), in Asgard's place: applications, images, clusters,
//! groups and instances, and deploy, rollback and finish from the browser, followed live.
//!
//! It is a thin layer like the command lines: reads go through the same calls as `launcher
//! status` and `bakery images list` ([`views`]), actions run the launcher's engine
//! ([`actions`]), and the pages and the JSON API under `/api/` show the same values. Where new
//! things go: a page is a view in [`views`], a function in [`pages`] and a route in [`routes`].
//!
//! Every request passes [`guard`] first: the Host header (on loopback, against DNS rebinding),
//! the login ([`auth`]), the CSRF token of every POST, and headers that forbid inline script,
//! framing and caching.

mod actions;
pub mod auth;
mod html;
mod pages;
mod routes;
mod views;

use crate::launch::cloud::Cloud;
use crate::provider::ImageRegistry;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use snafu::{ResultExt, Snafu};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Snafu)]
#[snafu(visibility(pub(crate)))]
pub enum Error {
    #[snafu(display(
        "the console listens on {listen}, beyond this host: give --auth-token-file (lines of name:token) so that only logins can use it"
    ))]
    NeedsToken { listen: SocketAddr },
    #[snafu(display("listening on {listen}: {source}"))]
    Bind { listen: SocketAddr, source: std::io::Error },
    #[snafu(display("serving: {source}"))]
    Serve { source: std::io::Error },
    #[snafu(display("the console's state in {}: {source}", path.display()))]
    StateDir { path: PathBuf, source: std::io::Error },
    #[snafu(display("{source}"))]
    Cloud { source: crate::launch::cloud::Error },
    #[snafu(display("{source}"))]
    Engine { source: Box<crate::launch::engine::Error> },
    #[snafu(display("listing images: {source}"))]
    Images { source: crate::provider::Error },
    #[snafu(display("{what} not found"))]
    NotFound { what: String },
    #[snafu(display("{message}"))]
    BadInput { message: String },
    /// Nothing to do, or not now.
    #[snafu(display("{message}"))]
    Conflict { message: String },
    #[snafu(display("starting the action: {source}"))]
    Start { source: std::io::Error },
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::BadInput { .. } => StatusCode::BAD_REQUEST,
            Error::Conflict { .. } => StatusCode::CONFLICT,
            // As the launcher's exit codes: 3 bad input, 4 nothing to act on, 5 locked.
            Error::Engine { source } => match source.exit_code() {
                3 => StatusCode::BAD_REQUEST,
                4 | 5 => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

pub struct Config {
    pub listen: SocketAddr,
    /// Required unless `listen` is a loopback address.
    pub logins: Option<auth::Logins>,
    /// Where the audit log goes (`console/audit.jsonl`).
    pub state_dir: PathBuf,
    /// Who a loopback console's visitors act as.
    pub local_user: String,
}

/// What every handler shares.
pub struct Console {
    cloud: Arc<dyn Cloud>,
    images: Arc<dyn ImageRegistry>,
    auth: auth::Auth,
    actions: actions::Actions,
    cancel: Arc<AtomicBool>,
    /// On loopback, the Host headers a request may carry (a page of another site resolving its
    /// name to 127.0.0.1 must not read this one).
    hosts: Option<Vec<String>>,
}

/// Serves until `cancel` is set, then lets running actions stop at their next step. `ready`
/// is told the address it listens on (the port may have been 0).
pub fn serve(
    config: Config,
    cloud: Arc<dyn Cloud>,
    images: Arc<dyn ImageRegistry>,
    cancel: Arc<AtomicBool>,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let listen = config.listen;
    snafu::ensure!(listen.ip().is_loopback() || config.logins.is_some(), NeedsTokenSnafu { listen });
    let actions = actions::Actions::new(&config.state_dir).context(StateDirSnafu { path: config.state_dir.clone() })?;
    let listener = std::net::TcpListener::bind(listen).context(BindSnafu { listen })?;
    listener.set_nonblocking(true).context(BindSnafu { listen })?;
    let bound = listener.local_addr().context(BindSnafu { listen })?;
    let hosts = listen.ip().is_loopback().then(|| {
        let port = bound.port();
        vec![format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}"), bound.to_string()]
    });
    let console = Arc::new(Console {
        cloud,
        images,
        auth: auth::Auth::new(config.logins, config.local_user),
        actions,
        cancel: cancel.clone(),
        hosts,
    });
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context(ServeSnafu)?;
    let serving = console.clone();
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).context(BindSnafu { listen })?;
        let app = routes::router(serving.clone())
            .layer(axum::middleware::from_fn_with_state(serving, guard))
            .into_make_service_with_connect_info::<SocketAddr>();
        ready(bound);
        // Followers' event streams end at shutdown; a client that holds on is cut off after 5 s.
        let server = axum::serve(listener, app).with_graceful_shutdown(cancelled(cancel.clone()));
        let cut_off = async {
            cancelled(cancel.clone()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        tokio::select! {
            served = server => served.context(ServeSnafu),
            () = cut_off => Ok(()),
        }
    });
    // Running actions were cancelled with the console: they stop at their next step.
    console.actions.wait_idle(Duration::from_secs(60));
    served
}

/// Resolves once `cancel` is set (Ctrl-C, SIGTERM).
async fn cancelled(cancel: Arc<AtomicBool>) {
    while !cancel.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `work` (library calls, which block) on a thread of its own.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    receiver.await.expect("a console worker thread panicked")
}

/// The largest form a page posts.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Security for every request: the Host check, who it is, CSRF on POST, and safe headers on
/// every answer.
async fn guard(
    State(console): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = check(&console, peer, request, next).await;
    let headers = response.headers_mut();
    let policy = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                  form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(policy));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

fn cookie_of<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    let cookies = request.headers().get_all(header::COOKIE).into_iter().filter_map(|v| v.to_str().ok());
    cookies.flat_map(|c| c.split(';')).find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

async fn check(console: &Console, peer: SocketAddr, mut request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    if let Some(hosts) = &console.hosts {
        if !hosts.contains(&host) {
            return refuse(StatusCode::MISDIRECTED_REQUEST, "this console answers on its own address only");
        }
    }
    let path = request.uri().path().to_string();
    let public = path.starts_with("/static/") || path == "/login";
    let is_post = request.method() == Method::POST;
    if is_post {
        // A browser names the page a POST came from: it must be one of ours.
        let origin = request.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok());
        if origin.is_some_and(|o| o != format!("http://{host}") && o != format!("https://{host}")) {
            return refuse(StatusCode::FORBIDDEN, "cross-site request refused");
        }
    }
    if public {
        return next.run(request).await;
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let cookie = cookie_of(&request, auth::SESSION_COOKIE).map(str::to_string);
    let credential = match (&bearer, &cookie) {
        (Some(token), _) => auth::Credential::Bearer(token),
        (None, Some(id)) => auth::Credential::Cookie(id),
        (None, None) => auth::Credential::None,
    };
    let api = path.starts_with("/api/");
    let open = !api || path == "/api/session";
    let (viewer, new_cookie) = match console.auth.check(credential, peer.ip(), open) {
        auth::Verdict::Allowed(viewer, cookie) => (viewer, cookie),
        auth::Verdict::TooMany => return refuse(StatusCode::TOO_MANY_REQUESTS, "too many failed sign-ins; wait"),
        // Never why: no token and a wrong one look the same.
        _ if api => return refuse(StatusCode::UNAUTHORIZED, "not signed in"),
        _ => return axum::response::Redirect::to("/login").into_response(),
    };
    if is_post {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request too large");
        };
        let from_header = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_string);
        let from_form = || {
            let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
            fields.into_iter().find(|(name, _)| name == "csrf").map(|(_, value)| value)
        };
        let token = from_header.or_else(from_form).unwrap_or_default();
        if !auth::same_token(&token, &viewer.csrf) {
            return refuse(StatusCode::FORBIDDEN, "missing or stale CSRF token: reload the page");
        }
        request = Request::from_parts(parts, axum::body::Body::from(bytes));
    }
    request.extensions_mut().insert(viewer);
    let mut response = next.run(request).await;
    if let Some(id) = new_cookie {
        if let Ok(value) = HeaderValue::from_str(&auth::session_cookie(&id)) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

#[cfg(test)]
mod tests;
