//! Packages over HTTP(S), as CI servers serve build artifacts: with credentials, through
//! redirects, and resuming a dropped download where it broke off.
//!
//! Credentials come from the environment (`BAKERY_HTTP_TOKEN`, sent as a bearer token, or
//! `BAKERY_HTTP_BASIC=user:token`, Jenkins' API-token form) for the package's own host, or from
//! a netrc file (`$NETRC`, else `~/.netrc`) for whichever host has an entry there. Redirects are
//! followed here, not by the HTTP client, so that the environment's credentials never travel
//! to another host (a Jenkins artifact redirected to a presigned object store URL must not
//! carry the Jenkins token). No credential, and no password in a URL, ever appears in a
//! message or a log line.

use base64::Engine as _;
use std::io::{self, Read};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Per read, so a stalled server fails the bake (or resumes it) instead of hanging it.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_REDIRECTS: usize = 5;
/// Resumptions of one download before its failure is final.
const MAX_RESUMES: u32 = 5;

/// An HTTP failure, told without the URL's credentials or the client's own wording of the URL.
#[derive(Debug)]
pub struct HttpError {
    /// The server's answer, where it gave one.
    pub status: Option<u16>,
    message: String,
}

impl HttpError {
    fn new(message: String) -> HttpError {
        HttpError { status: None, message }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

/// Where credentials may come from.
#[derive(Clone, Default)]
pub struct Credentials {
    /// From the environment: for the package's own host only.
    pub environment: Option<Authorization>,
    /// A netrc file's text: each host its own entry.
    pub netrc: Option<String>,
}

/// An `Authorization` header value. Not `Debug`: it must never be printed.
#[derive(Clone)]
pub struct Authorization(String);

impl Credentials {
    /// The environment's and the netrc file's credentials; none when there are none.
    pub fn from_environment() -> Credentials {
        let environment = match (std::env::var("BAKERY_HTTP_TOKEN"), std::env::var("BAKERY_HTTP_BASIC")) {
            (Ok(token), _) if !token.is_empty() => Some(Authorization(format!("Bearer {token}"))),
            (_, Ok(basic)) if !basic.is_empty() => Some(basic_authorization(&basic)),
            _ => None,
        };
        let netrc_path = std::env::var_os("NETRC")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| std::path::Path::new(&home).join(".netrc")));
        let netrc = netrc_path.and_then(|path| std::fs::read_to_string(path).ok());
        Credentials { environment, netrc }
    }

    /// What to send to `url`: the environment's credentials at the package's own origin
    /// (scheme, host and port), else the netrc entry for the host (or its `default`).
    fn for_url(&self, url: &str, package_url: &str) -> Option<Authorization> {
        if origin(url) == origin(package_url) {
            if let Some(authorization) = &self.environment {
                return Some(authorization.clone());
            }
        }
        let (login, password) = netrc_entry(self.netrc.as_deref()?, &host_of(url))?;
        Some(basic_authorization(&format!("{login}:{password}")))
    }
}

fn basic_authorization(user_and_token: &str) -> Authorization {
    Authorization(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_and_token)))
}

/// The login and password netrc gives `host`: its `machine` entry, else `default`.
fn netrc_entry(text: &str, host: &str) -> Option<(String, String)> {
    let mut tokens = text.split_whitespace();
    let mut entries: Vec<(Option<String>, Option<String>, Option<String>)> = Vec::new();
    while let Some(token) = tokens.next() {
        match token {
            "machine" => entries.push((tokens.next().map(str::to_string), None, None)),
            "default" => entries.push((None, None, None)),
            "login" | "password" => {
                let value = tokens.next().map(str::to_string);
                if let Some(entry) = entries.last_mut() {
                    match token {
                        "login" => entry.1 = value,
                        _ => entry.2 = value,
                    }
                }
            }
            // A macro runs to the next blank line; bakery has no use for it.
            "macdef" => break,
            _ => {}
        }
    }
    let machine = entries.iter().find(|(machine, ..)| machine.as_deref() == Some(host));
    let entry = machine.or_else(|| entries.iter().find(|(machine, ..)| machine.is_none()))?;
    Some((entry.1.clone().unwrap_or_default(), entry.2.clone()?))
}

/// The URL as it may be shown or recorded: without a `user:password@`, and without its query
/// and fragment, where tokens travel too (`?private_token=`, a presigned URL's signature).
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host = rest[..authority_end].rsplit_once('@').map_or(&rest[..authority_end], |(_, host)| host);
    format!("{scheme}://{host}{}", &rest[authority_end..])
}

/// Scheme, host and port: where the environment's credentials may go.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host).to_ascii_lowercase();
    let scheme = scheme.to_ascii_lowercase();
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    match host_port.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())) {
        Some(_) => format!("{scheme}://{host_port}"),
        None => format!("{scheme}://{host_port}{default_port}"),
    }
}

fn host_of(url: &str) -> String {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = without_scheme.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    // Hosts compare without the port: netrc names machines so.
    match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
        None => host_port.split(':').next().unwrap_or_default().to_ascii_lowercase(),
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).timeout_read(READ_TIMEOUT).redirects(0).build()
}

/// What went wrong with a request, without the URL's credentials or the client's wording of it.
fn describe(url: &str, error: ureq::Error) -> HttpError {
    let url = redacted(url);
    match error {
        ureq::Error::Status(code, response) => {
            HttpError { status: Some(code), message: format!("{url}: HTTP {code} {}", response.status_text()) }
        }
        ureq::Error::Transport(transport) => {
            let detail = transport.message().map(|m| format!(": {m}")).unwrap_or_default();
            HttpError::new(format!("{url}: {}{detail}", transport.kind()))
        }
    }
}

/// A GET that follows redirects itself, with the right credentials on each hop. `range_from`
/// asks for the bytes from that offset on.
fn get(
    agent: &ureq::Agent,
    url: &str,
    credentials: &Credentials,
    range_from: Option<u64>,
) -> Result<ureq::Response, HttpError> {
    let mut current = url.to_string();
    for _ in 0..=MAX_REDIRECTS {
        let mut request = agent.get(&current);
        if let Some(authorization) = credentials.for_url(&current, url) {
            request = request.set("Authorization", &authorization.0);
        }
        if let Some(from) = range_from {
            request = request.set("Range", &format!("bytes={from}-"));
        }
        let response = request.call().map_err(|e| describe(&current, e))?;
        let location = match response.status() {
            300..=399 => response.header("Location").map(str::to_string),
            _ => None,
        };
        let Some(location) = location else { return Ok(response) };
        let next = url::Url::parse(&current).and_then(|base| base.join(&location));
        let unusable = |e| HttpError::new(format!("{}: a redirect to an unusable address ({e})", redacted(&current)));
        let next: String = next.map_err(unusable)?.into();
        if current.starts_with("https:") && !next.starts_with("https:") {
            let shown = redacted(&current);
            return Err(HttpError::new(format!("{shown}: a redirect from https to {} is refused", redacted(&next))));
        }
        current = next;
    }
    Err(HttpError::new(format!("{}: more than {MAX_REDIRECTS} redirects", redacted(url))))
}

/// An HTTP(S) package: its reader (which resumes a dropped download) and its length when the
/// server says.
pub fn open(url: &str, credentials: Credentials) -> Result<(Box<dyn Read + Send>, Option<u64>), HttpError> {
    let agent = agent();
    let response = get(&agent, url, &credentials, None)?;
    let len = response.header("Content-Length").and_then(|len| len.parse().ok());
    let resumable = response.header("Accept-Ranges").is_none_or(|ranges| ranges != "none");
    let reader = Resuming {
        agent,
        url: url.to_string(),
        credentials,
        body: response.into_reader(),
        offset: 0,
        len,
        resumable,
        resumes: 0,
    };
    Ok((Box::new(reader), len))
}

/// A small text next to a package (its `.sha256`); None when the server has none (404).
pub fn get_text(url: &str, credentials: &Credentials, limit: u64) -> Result<Option<String>, HttpError> {
    let response = match get(&agent(), url, credentials, None) {
        Err(HttpError { status: Some(404), .. }) => return Ok(None),
        other => other?,
    };
    let mut text = String::new();
    response
        .into_reader()
        .take(limit)
        .read_to_string(&mut text)
        .map_err(|e| HttpError::new(format!("{}: {e}", redacted(url))))?;
    Ok(Some(text))
}

/// A download that, when the connection drops (an error, or an end before Content-Length),
/// asks for the rest with a Range request and carries on. Every byte still passes through
/// the reader thread's SHA-256, so a server that resumes with different bytes fails the
/// checksum.
struct Resuming {
    agent: ureq::Agent,
    url: String,
    credentials: Credentials,
    body: Box<dyn Read + Send + Sync>,
    offset: u64,
    len: Option<u64>,
    resumable: bool,
    resumes: u32,
}

impl Resuming {
    fn resume(&mut self, cause: io::Error) -> io::Result<()> {
        if !self.resumable || self.resumes >= MAX_RESUMES {
            return Err(cause);
        }
        self.resumes += 1;
        let url = redacted(&self.url);
        tracing::warn!(url, offset = self.offset, attempt = self.resumes, %cause, "download broke off; resuming");
        let response = get(&self.agent, &self.url, &self.credentials, Some(self.offset)).map_err(io::Error::other)?;
        let expected = format!("bytes {}-", self.offset);
        let range = response.header("Content-Range").unwrap_or_default();
        if response.status() != 206 || !range.starts_with(&expected) {
            let status = response.status();
            return Err(io::Error::other(format!(
                "{url}: the download broke off ({cause}) and the server cannot resume it at byte {} \
                 (it answered HTTP {status} {range})",
                self.offset
            )));
        }
        self.body = response.into_reader();
        Ok(())
    }
}

impl Read for Resuming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let read = self.body.read(buf);
            let cause = match read {
                Ok(0) if self.len.is_some_and(|len| self.offset < len) && !buf.is_empty() => {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed early")
                }
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            self.resume(cause)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// One request as the server saw it: its path and headers (names lowercased).
    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        headers: Vec<(String, String)>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
        }
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    /// Serves on `host` (a loopback name); `answer` writes each raw response, given what came
    /// before it.
    fn serve(host: &str, answer: impl Fn(&[Seen], &mut TcpStream) + Send + 'static) -> (String, Log) {
        let listener = TcpListener::bind(format!("{host}:0")).unwrap();
        let base = format!("http://{host}:{}", listener.local_addr().unwrap().port());
        let log: Log = Arc::default();
        let seen = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                let mut headers = Vec::new();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap() <= 2 {
                        break;
                    }
                    let (name, value) = header.split_once(':').unwrap();
                    headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
                }
                let mut all = seen.lock().unwrap();
                all.push(Seen { path, headers });
                answer(&all, &mut stream);
            }
        });
        (base, log)
    }

    fn body() -> Vec<u8> {
        (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn ok(stream: &mut TcpStream, body: &[u8]) {
        write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
        stream.write_all(body).unwrap();
    }

    fn read_all(url: &str, credentials: Credentials) -> io::Result<Vec<u8>> {
        let (mut reader, _) = open(url, credentials).map_err(io::Error::other)?;
        let mut out = Vec::new();
        reader.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn environment_credentials_stay_on_the_package_host_and_netrc_names_its_own() {
        let (store, store_log) = serve("localhost", |_, stream| ok(stream, &body()));
        let (jenkins, jenkins_log) = serve("127.0.0.1", move |_, stream| {
            write!(stream, "HTTP/1.1 302 Found\r\nLocation: {store}/blob\r\nContent-Length: 0\r\n\r\n").unwrap();
        });
        let url = format!("{jenkins}/job/hello/7/artifact/hello.tar.gz");
        let bearer = Credentials { environment: Some(Authorization("Bearer s3cr3t".into())), netrc: None };
        assert_eq!(read_all(&url, bearer).unwrap(), body());
        assert_eq!(jenkins_log.lock().unwrap()[0].header("authorization"), Some("Bearer s3cr3t"));
        let at_store = store_log.lock().unwrap()[0].clone();
        assert_eq!(at_store.path, "/blob");
        assert_eq!(at_store.header("authorization"), None, "the token does not follow the redirect to another host");

        let netrc = "machine 127.0.0.1 login jenkins password api-token\nmachine localhost login store password key\n";
        let credentials = Credentials { environment: None, netrc: Some(netrc.into()) };
        assert_eq!(read_all(&url, credentials).unwrap(), body());
        let basic = |pair: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
        assert_eq!(jenkins_log.lock().unwrap()[1].header("authorization"), Some(basic("jenkins:api-token").as_str()));
        assert_eq!(store_log.lock().unwrap()[1].header("authorization"), Some(basic("store:key").as_str()));
    }

    #[test]
    fn the_token_does_not_follow_a_redirect_to_another_port() {
        let (other, other_log) = serve("127.0.0.1", |_, stream| ok(stream, &body()));
        let (ci, _) = serve("127.0.0.1", move |_, stream| {
            write!(stream, "HTTP/1.1 302 Found\r\nLocation: {other}/blob\r\nContent-Length: 0\r\n\r\n").unwrap();
        });
        let bearer = Credentials { environment: Some(Authorization("Bearer s3cr3t".into())), netrc: None };
        assert_eq!(read_all(&format!("{ci}/artifact"), bearer).unwrap(), body());
        assert_eq!(other_log.lock().unwrap()[0].header("authorization"), None, "another port is another service");
    }

    #[test]
    fn a_dropped_download_resumes_with_a_range_request() {
        let (base, log) = serve("127.0.0.1", |seen, stream| {
            let body = body();
            let half = body.len() / 2;
            match seen.last().unwrap().header("range") {
                None => {
                    // Promise it all, send half, hang up.
                    let head =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n\r\n", body.len());
                    stream.write_all(head.as_bytes()).unwrap();
                    stream.write_all(&body[..half]).unwrap();
                }
                Some(range) => {
                    let from: usize = range.trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
                    let rest = &body[from..];
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\nContent-Length: {}\r\n\r\n",
                        body.len() - 1,
                        body.len(),
                        rest.len()
                    );
                    stream.write_all(head.as_bytes()).unwrap();
                    stream.write_all(rest).unwrap();
                }
            }
        });
        assert_eq!(read_all(&format!("{base}/app.tar.gz"), Credentials::default()).unwrap(), body());
        let seen = log.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].header("range"), Some(format!("bytes={}-", body().len() / 2).as_str()));
    }

    #[test]
    fn a_server_that_cannot_resume_fails_the_download_clearly() {
        let (base, _) = serve("127.0.0.1", |_, stream| {
            let body = body();
            write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
            stream.write_all(&body[..1000]).unwrap();
        });
        let error = read_all(&format!("{base}/app.tar.gz"), Credentials::default()).unwrap_err();
        assert!(error.to_string().contains("cannot resume it at byte 1000"), "{error}");
    }

    #[test]
    fn no_credential_appears_in_a_message() {
        let (base, log) = serve("127.0.0.1", |_, stream| {
            stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n").unwrap();
        });
        let with_password = base.replace("http://", "http://deploy:hunter2@");
        let credentials = Credentials { environment: Some(Authorization("Bearer s3cr3t".into())), netrc: None };
        let error = open(&format!("{with_password}/app.tar.gz"), credentials).err().unwrap();
        assert_eq!(error.status, Some(401));
        let message = error.to_string();
        assert!(message.contains("HTTP 401") && message.contains(&base), "{message}");
        assert!(
            !message.contains("hunter2") && !message.contains("s3cr3t") && !message.contains("deploy"),
            "{message}"
        );
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn urls_are_shown_without_their_password_or_query() {
        assert_eq!(redacted("https://u:p@ci.invalid:8443/a@b?private_token=x"), "https://ci.invalid:8443/a@b");
        assert_eq!(redacted("https://ci.invalid/job/1#frag"), "https://ci.invalid/job/1");
        assert_eq!(redacted("https://ci.invalid?x=1"), "https://ci.invalid");
        assert_eq!(origin("https://CI.invalid/x"), "https://ci.invalid:443");
        assert_eq!(origin("http://u:p@ci.invalid:8080/x"), "http://ci.invalid:8080");
        assert_eq!(host_of("https://u:p@CI.invalid:8443/x"), "ci.invalid");
        assert_eq!(host_of("http://[::1]:80/x"), "::1");
    }

    #[test]
    fn netrc_gives_a_machine_its_entry_else_the_default() {
        let netrc = "machine ci.invalid\n  login jenkins\n  password t1\ndefault login anon password t0\n";
        assert_eq!(netrc_entry(netrc, "ci.invalid"), Some(("jenkins".into(), "t1".into())));
        assert_eq!(netrc_entry(netrc, "other.invalid"), Some(("anon".into(), "t0".into())));
        assert_eq!(netrc_entry("machine ci.invalid login x\n", "ci.invalid"), None, "no password, no entry");
    }
}
