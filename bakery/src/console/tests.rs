//! The console's security over real HTTP on loopback: logins, CSRF, Host and Origin checks,
//! escaping, and what it refuses to do without a token. The cluster is simulated; the images
//! are a real local registry holding an image with hostile tags.

use super::*;
use crate::launch::cloud::{Capacity, GroupSpec};
use crate::launch::sim::{FakeClock, SimCloud};
use crate::local::registry::Registry;
use crate::provider::{Document, ImageRequest};
use std::collections::BTreeMap;

const ANN_TOKEN: &str = "ann-0123456789abcdef";
const HOSTILE: &str = "<script>document.title='owned'</script>\"'><img src=x>";

struct Served {
    url: String,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
    cloud: Arc<SimCloud>,
    state: tempfile::TempDir,
    image: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_for_test(logins: Option<&str>) -> Served {
    let state = tempfile::tempdir().unwrap();
    let cloud = Arc::new(SimCloud::new(Arc::new(FakeClock::new(1_000_000))));
    let spec = |version: u32, image: &str| GroupSpec {
        name: format!("hello-prod-v{version:03}"),
        cluster: "hello-prod".into(),
        image_id: image.into(),
        launch: Default::default(),
        ancestor: None,
        capacity: Capacity { min: 3, max: 3, desired: 3 },
        subnets: Vec::new(),
        target_groups: Vec::new(),
        health_url: "/".into(),
        registry_namespace: None,
        deploy_id: "deploy-1".into(),
    };
    let registry = Arc::new(Registry::open(state.path()).unwrap());
    let request = ImageRequest {
        name: "hello-1.0".into(),
        description: HOSTILE.into(),
        snapshot_id: "snap-1".into(),
        volume_size: 1 << 30,
        tags: BTreeMap::from([
            ("app".to_string(), "hello".to_string()),
            ("version".to_string(), HOSTILE.to_string()),
            (HOSTILE.to_string(), "key".to_string()),
        ]),
        parent: None,
        documents: BTreeMap::from([(Document::Manifest, br#"{"app": "hello", "files": []}"#.to_vec())]),
    };
    let image = registry.register_image(&request).unwrap().id;
    cloud.create_group(&spec(1, &image)).unwrap();
    cloud.add_to_service("hello-prod-v001").unwrap();
    cloud.create_group(&spec(0, "ami-00000000000000000")).unwrap();
    cloud.remove_from_service("hello-prod-v000", 999_000).unwrap();
    let logins = logins.map(auth::Logins::parse_for_test);
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        logins,
        state_dir: state.path().into(),
        local_user: "root".into(),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let (sender, receiver) = std::sync::mpsc::channel();
    let thread = {
        let (cloud, cancel) = (cloud.clone() as Arc<dyn Cloud>, cancel.clone());
        std::thread::spawn(move || serve(config, cloud, registry, cancel, |bound| sender.send(bound).unwrap()))
    };
    let bound = receiver.recv_timeout(Duration::from_secs(10)).expect("the console listens");
    Served { url: format!("http://{bound}"), cancel, thread: Some(thread), cloud, state, image }
}

/// An answer: status, headers we look at, body.
struct Answer {
    status: u16,
    location: Option<String>,
    cookies: Vec<String>,
    body: String,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().redirects(0).build()
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Answer {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("{error}"),
    };
    Answer {
        status: response.status(),
        location: response.header("location").map(str::to_string),
        cookies: response.all("set-cookie").into_iter().map(str::to_string).collect(),
        body: response.into_string().unwrap(),
    }
}

fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.set(name, value);
    }
    answer(request.call())
}

fn post_form(url: &str, headers: &[(&str, &str)], form: &[(&str, &str)]) -> Answer {
    let mut request = agent().post(url);
    for (name, value) in headers {
        request = request.set(name, value);
    }
    answer(request.send_form(form))
}

/// A loopback browser's session: its cookie header and CSRF token.
fn browser_session(served: &Served) -> (String, String) {
    let first = get(&format!("{}/api/session", served.url), &[]);
    let cookie = first.cookies[0].split(';').next().unwrap().to_string();
    let session: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    (cookie, session["csrf"].as_str().unwrap().to_string())
}

#[test]
fn beyond_loopback_it_will_not_listen_without_a_token_file() {
    let state = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        logins: None,
        state_dir: state.path().into(),
        local_user: "root".into(),
    };
    let cloud = Arc::new(SimCloud::new(Arc::new(FakeClock::new(0))));
    let registry = Arc::new(Registry::open(state.path()).unwrap());
    let served = serve(config, cloud, registry, Arc::default(), |_| panic!("it listened"));
    assert!(matches!(served, Err(Error::NeedsToken { .. })), "{served:?}");
}

#[test]
fn without_a_login_nothing_is_shown_and_wrong_tokens_are_refused_then_rate_limited() {
    let served = serve_for_test(Some(&format!("ann:{ANN_TOKEN}")));
    let api = format!("{}/api/clusters/hello-prod", served.url);
    let page = get(&format!("{}/clusters/hello-prod", served.url), &[]);
    assert_eq!((page.status, page.location.as_deref()), (303, Some("/login")));
    assert!(!page.body.contains("hello-prod-v001"));
    assert_eq!(get(&api, &[]).status, 401);
    let bearer = format!("Bearer {ANN_TOKEN}");
    let allowed = get(&api, &[("Authorization", &bearer)]);
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    assert!(allowed.body.contains("hello-prod-v001"));
    for _ in 0..5 {
        let refused = get(&api, &[("Authorization", "Bearer ann-0123456789abcdeX")]);
        assert_eq!(refused.status, 401);
        assert_eq!(refused.body, r#"{"error":"not signed in"}"#);
    }
    assert_eq!(get(&api, &[("Authorization", &bearer)]).status, 429);
    let signed = post_form(&format!("{}/login", served.url), &[], &[("token", ANN_TOKEN)]);
    assert_eq!(signed.status, 429);
}

#[test]
fn a_session_cookie_is_http_only_and_strict_and_no_page_shows_the_token() {
    let served = serve_for_test(Some(&format!("ann:{ANN_TOKEN}")));
    let wrong = post_form(&format!("{}/login", served.url), &[], &[("token", "not-the-right-token")]);
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("Sign-in failed.") && !wrong.body.contains("not-the-right-token"));
    let signed = post_form(&format!("{}/login", served.url), &[], &[("token", ANN_TOKEN)]);
    assert_eq!(signed.status, 303, "{}", signed.body);
    let cookie = &signed.cookies[0];
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let cookie = cookie.split(';').next().unwrap();
    for path in ["/", "/images", "/clusters/hello-prod", "/api/session", "/clusters/hello-prod/deploy"] {
        let shown = get(&format!("{}{path}", served.url), &[("Cookie", cookie)]);
        assert_eq!(shown.status, 200, "{path}: {}", shown.body);
        assert!(!shown.body.contains(ANN_TOKEN), "{path} shows the token");
    }
    let session = get(&format!("{}/api/session", served.url), &[("Cookie", cookie)]);
    assert!(session.body.contains("\"login\":\"ann\""), "{}", session.body);
}

#[test]
fn a_post_without_its_csrf_token_or_from_another_site_changes_nothing() {
    let served = serve_for_test(None);
    let (cookie, csrf) = browser_session(&served);
    let finish = format!("{}/clusters/hello-prod/finish", served.url);
    // Simulated health moves with every look: what must not change is which groups exist and serve.
    let groups = || -> Vec<(String, bool)> {
        served.cloud.groups("hello-prod").unwrap().into_iter().map(|g| (g.name, g.in_service)).collect()
    };
    let groups_before = groups();
    let confirmed = [("plan", "0123456789abcdef01234567")];
    let no_token = post_form(&finish, &[("Cookie", &cookie)], &confirmed);
    assert_eq!(no_token.status, 403, "{}", no_token.body);
    let wrong = post_form(&finish, &[("Cookie", &cookie)], &[("plan", "0123456789abcdef01234567"), ("csrf", "0123")]);
    assert_eq!(wrong.status, 403);
    // Another session's token is no better.
    let (_, other_csrf) = browser_session(&served);
    let stolen =
        post_form(&finish, &[("Cookie", &cookie)], &[("plan", "0123456789abcdef01234567"), ("csrf", &other_csrf)]);
    assert_eq!(stolen.status, 403);
    let cross_site = post_form(
        &finish,
        &[("Cookie", &cookie), ("Origin", "http://evil.example")],
        &[("plan", "0123456789abcdef01234567"), ("csrf", &csrf)],
    );
    assert_eq!(cross_site.status, 403);
    let api = agent()
        .post(&format!("{}/api/clusters/hello-prod/finish", served.url))
        .set("Cookie", &cookie)
        .send_string("{}");
    assert_eq!(answer(api).status, 403);
    assert_eq!(groups(), groups_before);
    assert!(!served.state.path().join("console/audit.jsonl").exists());
    // GET changes nothing either: it has no route that could.
    let get_finish = get(&finish, &[("Cookie", &cookie)]);
    assert_eq!(get_finish.status, 405);
    // With its token, the same request shows what would run first; a plan other than the one
    // running now (the cluster changed since) is shown again, not run.
    let review = post_form(&finish, &[("Cookie", &cookie)], &[("csrf", &csrf)]);
    assert_eq!(review.status, 200, "{}", review.body);
    assert!(review.body.contains("destroy hello-prod-v000 and its launch template"), "{}", review.body);
    let stale = post_form(&finish, &[("Cookie", &cookie)], &[("csrf", &csrf), ("plan", "0123456789abcdef01234567")]);
    assert_eq!(stale.status, 409, "{}", stale.body);
    assert!(stale.body.contains("The cluster changed since the review"), "{}", stale.body);
    assert_eq!(groups(), groups_before);
    assert!(!served.state.path().join("console/audit.jsonl").exists());

    // The reviewed plan, confirmed, runs: its page follows it, and the log says who and whence.
    let plan = review.body.split("name=\"plan\" value=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap();
    let confirmed = post_form(&finish, &[("Cookie", &cookie)], &[("csrf", &csrf), ("plan", plan)]);
    assert_eq!(confirmed.status, 303, "{}", confirmed.body);
    assert!(confirmed.location.as_deref().is_some_and(|l| l.starts_with("/actions/act-")), "{:?}", confirmed.location);
    let audit = served.state.path().join("console/audit.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&audit).unwrap_or_default().contains("\"result\":\"ok\"") {
        assert!(std::time::Instant::now() < deadline, "the finish did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = std::fs::read_to_string(&audit).unwrap();
    assert!(lines.lines().all(|l| l.contains("\"by\":\"root (console, from 127.0.0.1)\"")), "{lines}");
    assert_eq!(groups(), [("hello-prod-v001".to_string(), true)]);
}

#[test]
fn another_host_name_for_a_loopback_console_is_refused() {
    let served = serve_for_test(None);
    let rebound = get(&format!("{}/api/clusters", served.url), &[("Host", "evil.example:80")]);
    assert_eq!(rebound.status, 421, "{}", rebound.body);
}

#[test]
fn hostile_tags_render_as_text_under_a_policy_that_forbids_inline_script() {
    let served = serve_for_test(None);
    for path in ["/".to_string(), "/images".into(), format!("/images/{}", served.image), "/clusters/hello-prod".into()]
    {
        let response = agent().get(&format!("{}{path}", served.url)).call().unwrap();
        let policy = response.header("content-security-policy").unwrap().to_string();
        assert!(policy.contains("script-src 'self'") && !policy.contains("unsafe-inline"), "{policy}");
        let body = response.into_string().unwrap();
        assert!(!body.contains("<script>document") && !body.contains("<img src=x>"), "{path}: {body}");
        if path != "/" {
            assert!(
                body.contains("&lt;script&gt;document.title=&#39;owned&#39;&lt;/script&gt;&quot;&#39;&gt;"),
                "{path}"
            );
        }
    }
    let page = agent().get(&format!("{}/images/{}", served.url, served.image)).call().unwrap().into_string().unwrap();
    assert!(page.contains("/manifest\"") && !page.contains("/sbom\""), "no SBOM link for an image without one");
    let manifest = agent().get(&format!("{}/images/{}/manifest", served.url, served.image)).call().unwrap();
    assert_eq!(manifest.content_type(), "application/json");
    assert_eq!(manifest.into_string().unwrap(), r#"{"app": "hello", "files": []}"#);
    for (document, status) in [("sbom", 404), ("passwords", 404)] {
        let url = format!("{}/images/{}/{document}", served.url, served.image);
        match agent().get(&url).call() {
            Err(ureq::Error::Status(code, response)) => {
                assert_eq!(code, status);
                assert!(response.into_string().unwrap().contains(document), "the error names {document}");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    let bad = get(&format!("{}/clusters/%3Cb%3E", served.url), &[]);
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("&lt;b&gt;") && !bad.body.contains("<b>"), "{}", bad.body);
}
