//! A real browser for the console's tests: Debian's Chromium, driven headless through its
//! ChromeDriver over the W3C WebDriver protocol (a handful of JSON calls, made with ureq).
//! Missing Chromium or ChromeDriver fails the test: `scripts/install-deps` installs both.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// ChromeDriver's process, killed however the test ends (also when starting fails half way).
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Browser {
    // Dropped after the session is deleted (fields drop in order, after `Drop for Browser`).
    _driver: Driver,
    base: String,
    session: String,
    agent: ureq::Agent,
    _profile: tempfile::TempDir,
}

pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Browser {
    pub fn start() -> Browser {
        for program in [CHROMIUM, CHROMEDRIVER] {
            assert!(Path::new(program).exists(), "{program} is missing: run scripts/install-deps");
        }
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
        // A port found free may be taken before ChromeDriver binds it: then another one.
        let (driver, base) = (0..3)
            .find_map(|_| {
                let port = free_port();
                let child = Command::new(CHROMEDRIVER)
                    .arg(format!("--port={port}"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("starting chromedriver");
                let (mut driver, base) = (Driver(child), format!("http://127.0.0.1:{port}"));
                let deadline = Instant::now() + Duration::from_secs(30);
                while agent.get(&format!("{base}/status")).call().is_err() {
                    if Instant::now() > deadline || driver.0.try_wait().ok().flatten().is_some() {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some((driver, base))
            })
            .expect("chromedriver did not answer on any port tried");
        let profile = tempfile::tempdir().unwrap();
        // This machine's network is closed: Chromium's background connections are turned off.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        }}});
        let mut browser = Browser { _driver: driver, base, session: String::new(), agent, _profile: profile };
        let created = browser.call("POST", "/session", Some(capabilities));
        browser.session = created["sessionId"].as_str().expect("a session id").to_string();
        browser
    }

    /// One WebDriver call; its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let request = self.agent.request(method, &url);
        let response = match body {
            Some(body) => request.set("Content-Type", "application/json").send_string(&body.to_string()),
            None => request.call(),
        };
        let text = match response {
            Ok(response) => response.into_string().unwrap(),
            Err(ureq::Error::Status(code, response)) => {
                panic!("WebDriver {method} {path}: {code} {}", response.into_string().unwrap_or_default())
            }
            Err(error) => panic!("WebDriver {method} {path}: {error}"),
        };
        let value: Value = serde_json::from_str(&text).unwrap();
        value["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn title(&self) -> String {
        self.session_call("GET", "/title", None).as_str().unwrap_or_default().to_string()
    }

    pub fn url(&self) -> String {
        self.session_call("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    /// The first element `css` selects, waiting up to 10 s for it: a click that submits a form
    /// returns before the next page has loaded.
    pub fn find(&self, css: &str) -> Element<'_> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(element) = self.try_find(css) {
                return element;
            }
            if Instant::now() > deadline {
                let page = self.try_find("body").map(|body| body.text()).unwrap_or_default();
                panic!("no element {css} on {}: {page}", self.url())
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn try_find(&self, css: &str) -> Option<Element<'_>> {
        let found = self.session_call("POST", "/elements", Some(json!({ "using": "css selector", "value": css })));
        let first = found.as_array()?.first()?[ELEMENT].as_str()?.to_string();
        Some(Element { browser: self, id: first })
    }

    pub fn count(&self, css: &str) -> usize {
        let found = self.session_call("POST", "/elements", Some(json!({ "using": "css selector", "value": css })));
        found.as_array().map_or(0, Vec::len)
    }

    /// The page's visible text.
    pub fn text(&self) -> String {
        self.find("body").text()
    }

    /// Waits until `ready` holds, up to `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, mut ready: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + limit;
        while !ready(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; page: {}", self.text());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG of the window, saved under `dir`.
    pub fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        use base64::Engine as _;
        let encoded = self.session_call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(encoded.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Element<'_> {
    pub fn click(&self) {
        self.browser.session_call("POST", &format!("/element/{}/click", self.id), Some(json!({})));
    }

    pub fn text(&self) -> String {
        let text = self.browser.session_call("GET", &format!("/element/{}/text", self.id), None);
        text.as_str().unwrap_or_default().to_string()
    }

    pub fn attribute(&self, name: &str) -> Option<String> {
        let value = self.browser.session_call("GET", &format!("/element/{}/attribute/{name}", self.id), None);
        value.as_str().map(str::to_string)
    }

    /// Replaces the field's value with `text`.
    pub fn fill(&self, text: &str) {
        self.browser.session_call("POST", &format!("/element/{}/clear", self.id), Some(json!({})));
        self.browser.session_call("POST", &format!("/element/{}/value", self.id), Some(json!({ "text": text })));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.agent.delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
    }
}
