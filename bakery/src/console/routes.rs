//! The console's URLs: pages for people, `/api/` for the pages' script and for CI. Reads are
//! GET and change nothing; actions are POST (the guard has checked their CSRF token) and, from a
//! page, run only on a second POST carrying the fingerprint of the plan the first one showed.

use super::actions::{Request as ActionRequest, Run};
use super::auth::{session_cookie, Verdict, Viewer, SESSION_COOKIE};
use super::html::{url_part, Header};
use super::views::{self, ClusterView};
use super::{blocking, pages, Console, Error};
use crate::ids::unix_now as now;
use crate::launch::plan::{DeployRequest, StrategyKind};
use crate::launch::soak::Thresholds;
use crate::provider::Document;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

type Shared = State<Arc<Console>>;

pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/static/console.js", get(|| async { static_file("text/javascript", include_str!("console.js")) }))
        .route("/static/console.css", get(|| async { static_file("text/css", include_str!("console.css")) }))
        .route("/login", get(sign_in_page).post(sign_in))
        .route("/logout", post(sign_out))
        .route("/", get(applications_page))
        .route("/images", get(images_page))
        .route("/images/{id}", get(image_page))
        .route("/images/{id}/{document}", get(image_document))
        .route("/clusters/{cluster}", get(cluster_page))
        .route("/clusters/{cluster}/groups/{group}", get(group_page))
        .route("/clusters/{cluster}/deploy", get(deploy_page).post(deploy_from_page))
        .route("/clusters/{cluster}/rollback", post(rollback_from_page))
        .route("/clusters/{cluster}/finish", post(finish_from_page))
        .route("/actions/{id}", get(action_page))
        .route("/api/session", get(session))
        .route("/api/applications", get(api_applications))
        .route("/api/images", get(api_images))
        .route("/api/images/{id}", get(api_image))
        .route("/api/clusters", get(api_clusters))
        .route("/api/clusters/{cluster}", get(api_cluster))
        .route("/api/clusters/{cluster}/groups/{group}", get(api_group))
        .route("/api/clusters/{cluster}/deploy", post(api_deploy))
        .route("/api/clusters/{cluster}/rollback", post(api_rollback))
        .route("/api/clusters/{cluster}/finish", post(api_finish))
        .route("/api/actions/{id}", get(api_action))
        .route("/api/actions/{id}/events", get(api_action_events))
        .with_state(console)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn header<'a>(console: &'a Console, viewer: &'a Viewer) -> Header<'a> {
    Header { login: &viewer.login, csrf: &viewer.csrf, signed_in: viewer.signed_in, provider: console.cloud.kind() }
}

/// A page, or the problem page with the error's status.
fn page(console: &Console, viewer: &Viewer, rendered: Result<String, Error>) -> Response {
    match rendered {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            let status = error.status();
            let html = pages::problem(status.as_u16(), &error.to_string(), &header(console, viewer));
            (status, Html(html)).into_response()
        }
    }
}

/// The API's answer: the value as JSON, or `{"error": …}` with the error's status.
fn api<T: serde::Serialize>(result: Result<T, Error>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(error) => (error.status(), Json(serde_json::json!({ "error": error.to_string() }))).into_response(),
    }
}

// Signing in and out.

async fn sign_in_page(State(console): Shared) -> Response {
    match console.auth.needs_login() {
        true => Html(pages::sign_in(None)).into_response(),
        false => Redirect::to("/").into_response(),
    }
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

async fn sign_in(
    State(console): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<SignIn>,
) -> Response {
    match console.auth.sign_in(form.token.trim(), peer.ip()) {
        Ok(id) => {
            let mut response = Redirect::to("/").into_response();
            if let Ok(value) = HeaderValue::from_str(&session_cookie(&id)) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        // Never why: a wrong token and an unknown one look the same.
        Err(Verdict::TooMany) => {
            (StatusCode::TOO_MANY_REQUESTS, Html(pages::sign_in(Some("Too many attempts: wait a minute."))))
                .into_response()
        }
        Err(_) => (StatusCode::UNAUTHORIZED, Html(pages::sign_in(Some("Sign-in failed.")))).into_response(),
    }
}

async fn sign_out(State(console): Shared, request: axum::extract::Request) -> Response {
    if let Some(id) = super::cookie_of(&request, SESSION_COOKIE) {
        console.auth.sign_out(id);
    }
    let mut response = Redirect::to("/login").into_response();
    if let Ok(value) = HeaderValue::from_str(&session_cookie("")) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn session(Extension(viewer): Extension<Viewer>) -> Response {
    Json(serde_json::json!({ "login": viewer.login, "from": viewer.from, "csrf": viewer.csrf })).into_response()
}

// Reads.

async fn read_applications(console: &Arc<Console>) -> Result<Vec<views::Application>, Error> {
    let console = console.clone();
    blocking(move || {
        let images = views::images(console.images.as_ref(), None)?;
        views::applications(console.cloud.as_ref(), &images)
    })
    .await
}

async fn applications_page(State(console): Shared, Extension(viewer): Extension<Viewer>) -> Response {
    let apps = read_applications(&console).await;
    page(&console, &viewer, apps.map(|apps| pages::applications(&apps, &header(&console, &viewer))))
}

async fn api_applications(State(console): Shared) -> Response {
    api(read_applications(&console).await)
}

#[derive(Deserialize)]
struct ImagesQuery {
    app: Option<String>,
}

async fn read_images(console: &Arc<Console>, app: Option<String>) -> Result<Vec<crate::provider::Image>, Error> {
    let console = console.clone();
    blocking(move || views::images(console.images.as_ref(), app.as_deref().filter(|a| !a.is_empty()))).await
}

async fn images_page(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Query(query): Query<ImagesQuery>,
) -> Response {
    let app = query.app.filter(|a| !a.is_empty());
    let all = read_images(&console, None).await;
    let rendered = all.map(|all| {
        let apps: std::collections::BTreeSet<String> = all.iter().filter_map(|i| i.tags.get("app").cloned()).collect();
        let apps: Vec<String> = apps.into_iter().collect();
        let shown: Vec<_> = match &app {
            Some(app) => all.into_iter().filter(|i| i.tags.get("app") == Some(app)).collect(),
            None => all,
        };
        pages::images(&shown, &apps, app.as_deref(), &header(&console, &viewer))
    });
    page(&console, &viewer, rendered)
}

async fn api_images(State(console): Shared, Query(query): Query<ImagesQuery>) -> Response {
    api(read_images(&console, query.app).await)
}

async fn read_image(console: &Arc<Console>, id: String) -> Result<crate::provider::Image, Error> {
    let images = console.images.clone();
    let found = blocking(move || {
        let image = images.find_image(&id).map_err(|source| Error::Images { source })?;
        // `find_image` also takes names; the page is for ids.
        image.filter(|i| i.id == id).ok_or(Error::NotFound { what: format!("image {id}") })
    });
    found.await
}

async fn image_page(State(console): Shared, Extension(viewer): Extension<Viewer>, Path(id): Path<String>) -> Response {
    let image = read_image(&console, id).await;
    page(&console, &viewer, image.map(|i| pages::image(&i, &header(&console, &viewer))))
}

/// One of the bake's documents (manifest, sbom, provenance), as JSON, where the registry keeps
/// it next to the image.
async fn image_document(State(console): Shared, Path((id, name)): Path<(String, String)>) -> Response {
    let images = console.images.clone();
    let found = blocking(move || {
        let not_found = |what: String| Error::NotFound { what };
        let document = Document::ALL
            .into_iter()
            .find(|d| d.as_str() == name)
            .ok_or_else(|| not_found(format!("a document named {name} (manifest, sbom or provenance)")))?;
        let content = images.document(&id, document).map_err(|source| Error::Images { source })?;
        content.ok_or_else(|| {
            not_found(format!(
                "the {name} of image {id} next to it (it is inside the image, {})",
                document.image_path()
            ))
        })
    });
    match found.await {
        Ok(content) => ([(header::CONTENT_TYPE, "application/json")], content).into_response(),
        Err(error) => api::<()>(Err(error)),
    }
}

async fn api_image(State(console): Shared, Path(id): Path<String>) -> Response {
    api(read_image(&console, id).await)
}

async fn api_clusters(State(console): Shared) -> Response {
    let cloud = console.cloud.clone();
    api(blocking(move || cloud.clusters().map_err(|source| Error::Cloud { source })).await)
}

async fn read_cluster(console: &Arc<Console>, cluster: String) -> Result<ClusterView, Error> {
    let console = console.clone();
    blocking(move || views::cluster(console.cloud.as_ref(), console.images.as_ref(), &cluster)).await
}

async fn cluster_page(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path(cluster): Path<String>,
) -> Response {
    let view = read_cluster(&console, cluster).await;
    page(&console, &viewer, view.map(|v| pages::cluster(&v, &header(&console, &viewer), now())))
}

async fn api_cluster(State(console): Shared, Path(cluster): Path<String>) -> Response {
    api(read_cluster(&console, cluster).await)
}

fn group_of(view: &ClusterView, group: &str) -> Result<crate::launch::cloud::Group, Error> {
    view.group(group).cloned().ok_or(Error::NotFound { what: format!("group {group} in {}", view.status.cluster) })
}

async fn group_page(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path((cluster, group)): Path<(String, String)>,
) -> Response {
    let view = read_cluster(&console, cluster).await;
    let rendered = view.and_then(|v| Ok(pages::group(&v, &group_of(&v, &group)?, &header(&console, &viewer), now())));
    page(&console, &viewer, rendered)
}

async fn api_group(State(console): Shared, Path((cluster, group)): Path<(String, String)>) -> Response {
    api(read_cluster(&console, cluster).await.and_then(|v| group_of(&v, &group)))
}

fn action_of(console: &Console, id: &str) -> Result<Arc<Run>, Error> {
    console.actions.get(id).ok_or(Error::NotFound { what: format!("action {id}") })
}

async fn action_page(State(console): Shared, Extension(viewer): Extension<Viewer>, Path(id): Path<String>) -> Response {
    let run = action_of(&console, &id);
    page(&console, &viewer, run.map(|r| pages::action(&r.summary(), &header(&console, &viewer))))
}

async fn api_action(State(console): Shared, Path(id): Path<String>) -> Response {
    match action_of(&console, &id) {
        Ok(run) => Json(run.summary()).into_response(),
        Err(error) => api::<()>(Err(error)),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Lines the page already shows.
    from: Option<usize>,
}

/// The action's lines as server-sent events (`line`), then its ending (`end`).
async fn api_action_events(
    State(console): Shared,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> Response {
    let run = match action_of(&console, &id) {
        Ok(run) => run,
        Err(error) => return api::<()>(Err(error)),
    };
    // A reconnecting EventSource says the last line it has; each line's id is its index.
    let resumed = headers.get("last-event-id").and_then(|v| v.to_str().ok()?.parse::<usize>().ok()).map(|id| id + 1);
    let following = Following {
        follower: run.follow(),
        run,
        next: resumed.or(query.from).unwrap_or(0),
        pending: VecDeque::new(),
        ended: false,
        cancel: console.cancel.clone(),
    };
    let stream = futures::stream::unfold(following, |mut at| async move {
        loop {
            if let Some(event) = at.pending.pop_front() {
                return Some((Ok::<SseEvent, Infallible>(event), at));
            }
            if at.ended {
                return None;
            }
            let (lines, ending) = at.run.since(at.next);
            for (offset, line) in lines.iter().enumerate() {
                let id = (at.next + offset).to_string();
                at.pending.extend(SseEvent::default().event("line").id(id).json_data(line).ok());
            }
            at.next += lines.len();
            if let Some(ending) = ending {
                at.pending.extend(SseEvent::default().event("end").json_data(&ending).ok());
                at.ended = true;
            } else if at.pending.is_empty() {
                // Until the next line, or the console stopping.
                tokio::select! {
                    changed = at.follower.changed() => if changed.is_err() { return None },
                    () = super::cancelled(at.cancel.clone()) => return None,
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// Where a follower of an action's events is.
struct Following {
    run: Arc<Run>,
    /// The index of the next line to send.
    next: usize,
    follower: tokio::sync::watch::Receiver<usize>,
    pending: VecDeque<SseEvent>,
    ended: bool,
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

// Actions.

/// A count from a form (text, maybe empty) or from JSON (a number).
#[derive(Deserialize)]
#[serde(untagged)]
enum Count {
    Number(u32),
    Text(String),
}

impl Count {
    fn value(field: &str, count: &Option<Count>) -> Result<Option<u32>, Error> {
        match count {
            None => Ok(None),
            Some(Count::Number(n)) => Ok(Some(*n)),
            Some(Count::Text(t)) if t.trim().is_empty() => Ok(None),
            Some(Count::Text(t)) => t
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| Error::BadInput { message: format!("{field} must be a whole number, not {t:?}") }),
        }
    }
}

/// A deploy as the page's form and the API's JSON give it (the launcher's flags by name).
#[derive(Deserialize)]
struct DeployInput {
    image: String,
    strategy: Option<String>,
    min: Option<Count>,
    desired: Option<Count>,
    max: Option<Count>,
    health_url: Option<String>,
    health_timeout: Option<String>,
    soak: Option<String>,
    /// aws: target group ARNs, comma-separated.
    target_groups: Option<String>,
    /// aws: the Cloud Map namespace.
    registry_namespace: Option<String>,
    /// The fingerprint of the plan the page reviewed: present, the deploy runs if it still holds.
    plan: Option<String>,
}

fn split_list(text: Option<&str>) -> Vec<String> {
    let items = text.unwrap_or_default().split(',').map(str::trim).filter(|item| !item.is_empty());
    items.map(String::from).collect()
}

fn duration(field: &str, text: Option<&str>, default: Option<Duration>) -> Result<Option<Duration>, Error> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text)
            .map(Some)
            .map_err(|e| Error::BadInput { message: format!("{field} {text:?}: {e}") }),
    }
}

impl DeployInput {
    fn request(&self, cluster: &str) -> Result<DeployRequest, Error> {
        let strategy = self.strategy.as_deref().filter(|s| !s.is_empty()).unwrap_or("red-black");
        let strategy: StrategyKind =
            strategy.parse().map_err(|e| Error::BadInput { message: format!("strategy {strategy:?}: {e}") })?;
        let health_url = self.health_url.as_deref().map(str::trim).filter(|u| !u.is_empty()).unwrap_or("/");
        let soak = duration("soak", self.soak.as_deref(), None)?;
        Ok(DeployRequest {
            cluster: cluster.to_string(),
            image_id: self.image.trim().to_string(),
            strategy,
            min: Count::value("min", &self.min)?,
            max: Count::value("max", &self.max)?,
            desired: Count::value("desired", &self.desired)?,
            launch: Default::default(),
            subnets: Vec::new(),
            target_groups: split_list(self.target_groups.as_deref()),
            health_url: health_url.to_string(),
            registry_namespace: self
                .registry_namespace
                .as_deref()
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from),
            health_timeout: duration("health timeout", self.health_timeout.as_deref(), Some(Duration::from_secs(600)))?
                .unwrap_or_default(),
            keep: 2,
            soak: soak.map(|soak| (soak, Thresholds::default())),
        })
    }
}

fn start(console: &Arc<Console>, cluster: &str, request: ActionRequest, viewer: &Viewer) -> Result<Arc<Run>, Error> {
    views::cluster_name(cluster)?;
    console
        .actions
        .start(console.cloud.clone(), console.cancel.clone(), cluster, request, viewer)
        .map_err(|source| Error::Start { source })
}

fn started(run: Result<Arc<Run>, Error>) -> Response {
    match run {
        Ok(run) => {
            let answer = serde_json::json!({
                "id": run.id,
                "page": format!("/actions/{}", url_part(&run.id)),
                "events": format!("/api/actions/{}/events", url_part(&run.id)),
            });
            (StatusCode::ACCEPTED, Json(answer)).into_response()
        }
        Err(error) => api::<()>(Err(error)),
    }
}

fn follow(console: &Console, viewer: &Viewer, run: Result<Arc<Run>, Error>) -> Response {
    match run {
        Ok(run) => Redirect::to(&format!("/actions/{}", url_part(&run.id))).into_response(),
        Err(error) => page(console, viewer, Err(error)),
    }
}

async fn deploy_page(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path(cluster): Path<String>,
) -> Response {
    let rendered = {
        let console = console.clone();
        let viewer = viewer.clone();
        blocking(move || {
            let app = views::cluster_name(&cluster)?.app;
            let images = views::images(console.images.as_ref(), Some(&app))?;
            let view = match views::cluster(console.cloud.as_ref(), console.images.as_ref(), &cluster) {
                Ok(view) => Some(view),
                Err(Error::NotFound { .. }) => None,
                Err(error) => return Err(error),
            };
            let form = pages::DeployForm {
                cluster: &cluster,
                aws: console.cloud.kind() == "aws",
                images: &images,
                serving: view.as_ref().and_then(|v| v.serving()),
                problem: images.is_empty().then_some("No image of this application has been baked yet."),
            };
            Ok(pages::deploy_form(&form, &header(&console, &viewer)))
        })
        .await
    };
    page(&console, &viewer, rendered)
}

/// A page's action: the review of what it will do now, or, once confirmed, the action itself,
/// but only while the plan is still the one reviewed (its fingerprint came back in `shown`);
/// otherwise the new plan is shown for review again (409).
async fn review_or_start(
    console: Arc<Console>,
    viewer: Viewer,
    cluster: String,
    request: ActionRequest,
    shown: Option<String>,
    mut fields: Vec<(&'static str, String)>,
) -> Response {
    let reviewed = {
        let (console, cluster, request) = (console.clone(), cluster.clone(), request.clone());
        blocking(move || views::review(console.cloud.as_ref(), &cluster, &request)).await
    };
    let review = match reviewed {
        Ok(review) => review,
        Err(error) => return page(&console, &viewer, Err(error)),
    };
    if shown.as_deref() == Some(review.fingerprint.as_str()) {
        return follow(&console, &viewer, start(&console, &cluster, request, &viewer));
    }
    let verb = request.name();
    let action = format!("/clusters/{}/{verb}", url_part(&cluster));
    let notice = shown.is_some().then_some("The cluster changed since the review: this is what would run now.");
    fields.push(("plan", review.fingerprint.clone()));
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let title = format!("{verb} {cluster}?");
    let html = pages::confirm(&title, &review.steps, notice, &action, &fields, &header(&console, &viewer));
    let status = if shown.is_some() { StatusCode::CONFLICT } else { StatusCode::OK };
    (status, Html(html)).into_response()
}

async fn deploy_from_page(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path(cluster): Path<String>,
    Form(input): Form<DeployInput>,
) -> Response {
    let request = match input.request(&cluster) {
        Ok(request) => request,
        Err(error) => return page(&console, &viewer, Err(error)),
    };
    let fields = vec![
        ("image", input.image.clone()),
        ("strategy", input.strategy.clone().unwrap_or_default()),
        ("min", count_text(&input.min)),
        ("desired", count_text(&input.desired)),
        ("max", count_text(&input.max)),
        ("health_url", input.health_url.clone().unwrap_or_default()),
        ("health_timeout", input.health_timeout.clone().unwrap_or_default()),
        ("soak", input.soak.clone().unwrap_or_default()),
        ("target_groups", input.target_groups.clone().unwrap_or_default()),
        ("registry_namespace", input.registry_namespace.clone().unwrap_or_default()),
    ];
    let request = ActionRequest::Deploy(Box::new(request));
    review_or_start(console, viewer, cluster, request, input.plan, fields).await
}

fn count_text(count: &Option<Count>) -> String {
    match count {
        Some(Count::Number(n)) => n.to_string(),
        Some(Count::Text(t)) => t.clone(),
        None => String::new(),
    }
}

/// A rollback's or finish's review, or its confirmation (`plan`: the reviewed plan's fingerprint).
#[derive(Deserialize)]
struct Confirmation {
    plan: Option<String>,
}

/// A page's rollback waits as long as the command line's default.
const ROLLBACK_HEALTH_TIMEOUT_SECS: u64 = 600;

async fn rollback_from_page(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path(cluster): Path<String>,
    Form(form): Form<Confirmation>,
) -> Response {
    let request = ActionRequest::Rollback { health_timeout_secs: ROLLBACK_HEALTH_TIMEOUT_SECS };
    review_or_start(console, viewer, cluster, request, form.plan, Vec::new()).await
}

/// From the console, finishing destroys every disabled group now: the review names them.
async fn finish_from_page(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path(cluster): Path<String>,
    Form(form): Form<Confirmation>,
) -> Response {
    let request = ActionRequest::Finish { soak_secs: 0 };
    review_or_start(console, viewer, cluster, request, form.plan, Vec::new()).await
}

async fn api_deploy(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path(cluster): Path<String>,
    Json(input): Json<DeployInput>,
) -> Response {
    let request = input.request(&cluster);
    started(request.and_then(|r| start(&console, &cluster, ActionRequest::Deploy(Box::new(r)), &viewer)))
}

/// The API's rollback and finish: a duration field, or the command line's default.
#[derive(Deserialize)]
struct DurationInput {
    health_timeout: Option<String>,
    soak: Option<String>,
}

async fn api_rollback(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path(cluster): Path<String>,
    body: Option<Json<DurationInput>>,
) -> Response {
    let timeout = body.as_ref().and_then(|Json(b)| b.health_timeout.as_deref());
    let timeout = duration("health timeout", timeout, Some(Duration::from_secs(ROLLBACK_HEALTH_TIMEOUT_SECS)));
    let request = timeout.map(|t| ActionRequest::Rollback { health_timeout_secs: t.unwrap_or_default().as_secs() });
    started(request.and_then(|r| start(&console, &cluster, r, &viewer)))
}

async fn api_finish(
    State(console): Shared,
    Extension(viewer): Extension<Viewer>,
    Path(cluster): Path<String>,
    body: Option<Json<DurationInput>>,
) -> Response {
    let soak = body.as_ref().and_then(|Json(b)| b.soak.as_deref());
    // As `launcher finish`: a group disabled less than 12 h ago stays for a rollback.
    let request = duration("soak", soak, Some(Duration::from_secs(12 * 3600)))
        .map(|s| ActionRequest::Finish { soak_secs: s.unwrap_or_default().as_secs() });
    started(request.and_then(|r| start(&console, &cluster, r, &viewer)))
}
