//! Who may use the console. On loopback without a token file, whoever can reach the port is this
//! host's user; anywhere else every request needs a login: a session cookie (`HttpOnly`,
//! `SameSite=Strict`) from signing in with a token, or `Authorization: Bearer TOKEN`. Wrong
//! tokens are refused without saying why and, after a few, refused outright for a while.
//! Every state change carries the session's CSRF token, whoever made it.
//!
//! Tokens are compared as SHA-256 digests and never kept, logged or shown in clear.

use sha2::{Digest, Sha256};
use snafu::{ResultExt, Snafu};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("reading the token file {}: {source}", path.display()))]
    Read { path: PathBuf, source: std::io::Error },
    #[snafu(display(
        "the token file {} can be read by other users (mode {mode:o}): chmod 600 it",
        path.display()
    ))]
    Exposed { path: PathBuf, mode: u32 },
    #[snafu(display("the token file {}, line {line}: {problem}", path.display()))]
    Line { path: PathBuf, line: usize, problem: String },
    #[snafu(display("the token file {} holds no login", path.display()))]
    Empty { path: PathBuf },
}

/// Shortest token accepted: guessing must be hopeless even without the rate limit.
const MIN_TOKEN_LEN: usize = 16;
/// Failed sign-ins from one address within [`FAILURE_WINDOW`] before it is refused outright.
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a session lasts after signing in.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
pub const SESSION_COOKIE: &str = "bakery_session";

/// The `Set-Cookie` value that carries session `id` (an empty id with age 0 removes it).
pub fn session_cookie(id: &str) -> String {
    let expiry = if id.is_empty() { "; Max-Age=0" } else { "" };
    format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{expiry}")
}
/// Sessions kept at once: clients that never send their cookie back (on loopback each gets one)
/// must not grow memory without bound. The one closest to expiring goes first.
const MAX_SESSIONS: usize = 10_000;

/// The logins a token file names: one `name:token` a line (`#` starts a comment).
pub struct Logins {
    /// SHA-256 of each token → the login's name.
    by_digest: BTreeMap<[u8; 32], String>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Logins {
    pub fn load(path: &Path) -> Result<Logins, Error> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).context(ReadSnafu { path })?.permissions().mode();
        snafu::ensure!(mode & 0o077 == 0, ExposedSnafu { path, mode: mode & 0o777 });
        let text = std::fs::read_to_string(path).context(ReadSnafu { path })?;
        Logins::parse(&text)
            .map_err(|(line, problem)| Error::Line { path: path.into(), line, problem })?
            .ok_or_else(|| Error::Empty { path: path.into() })
    }

    /// The logins in `text`, None when there are none; Err((line, problem)) names the first
    /// bad line (without its token).
    fn parse(text: &str) -> Result<Option<Logins>, (usize, String)> {
        let mut by_digest = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let number = index + 1;
            let Some((name, token)) = line.split_once(':') else {
                return Err((number, "expected name:token".into()));
            };
            let name = name.trim();
            let valid_name = |c: char| c.is_ascii_alphanumeric() || "-_.@".contains(c);
            // Problems name the line only: a line written the wrong way round would show a token.
            if name.is_empty() || !name.chars().all(valid_name) {
                return Err((number, "a login name is letters, digits and -_.@".into()));
            }
            if token.trim().len() < MIN_TOKEN_LEN {
                return Err((number, format!("the token is shorter than {MIN_TOKEN_LEN} characters")));
            }
            if by_digest.insert(digest(token.trim()), name.to_string()).is_some() {
                return Err((number, "the token is also another login's".into()));
            }
        }
        Ok((!by_digest.is_empty()).then_some(Logins { by_digest }))
    }

    #[cfg(test)]
    pub fn parse_for_test(text: &str) -> Logins {
        Logins::parse(text).unwrap().unwrap()
    }

    fn login(&self, token: &str) -> Option<&str> {
        self.by_digest.get(&digest(token)).map(String::as_str)
    }
}

/// A signed-in browser, or a bearer token's standing session.
#[derive(Clone)]
pub struct Session {
    pub login: String,
    pub csrf: String,
    expires: Instant,
}

/// Who is asking, as handlers see it.
#[derive(Clone)]
pub struct Viewer {
    pub login: String,
    pub from: IpAddr,
    pub csrf: String,
    /// Signed in with a token (so signing out means something).
    pub signed_in: bool,
}

impl Viewer {
    /// As deploy records and the audit log name who acted.
    pub fn actor(&self) -> String {
        format!("{} (console, from {})", self.login, self.from)
    }
}

/// How a request proved who it is.
pub enum Credential<'a> {
    Cookie(&'a str),
    Bearer(&'a str),
    None,
}

/// What became of a request's credential.
pub enum Verdict {
    /// Known: the viewer, and a cookie to set when a session was just made.
    Allowed(Viewer, Option<String>),
    /// No credential where one is needed.
    SignIn,
    /// A wrong credential, or too many lately from this address.
    Refused,
    TooMany,
}

pub struct Auth {
    /// None: loopback, whoever reaches the port is `local_user`.
    logins: Option<Logins>,
    local_user: String,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
    /// Keys the CSRF token of a bearer token's session, so that it is stable and not the token.
    secret: [u8; 32],
}

pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut buffer);
    hex::encode(buffer)
}

impl Auth {
    pub fn new(logins: Option<Logins>, local_user: String) -> Auth {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        Auth { logins, local_user, sessions: Mutex::default(), failures: Mutex::default(), secret }
    }

    pub fn needs_login(&self) -> bool {
        self.logins.is_some()
    }

    /// Who a request is, from its credential. On loopback a request without a session gets one
    /// only if `open` (pages and `/api/session`): other API calls must not crowd out browsers'.
    pub fn check(&self, credential: Credential, from: IpAddr, open: bool) -> Verdict {
        let session = match credential {
            Credential::Cookie(id) => self.session(id),
            _ => None,
        };
        if let Some(session) = session {
            let viewer = Viewer { login: session.login, from, csrf: session.csrf, signed_in: self.logins.is_some() };
            return Verdict::Allowed(viewer, None);
        }
        let Some(logins) = &self.logins else {
            // Loopback: a browser gets a session of this host's user, for its CSRF token.
            if !open {
                let viewer = Viewer { login: self.local_user.clone(), from, csrf: String::new(), signed_in: false };
                return Verdict::Allowed(viewer, None);
            }
            let (id, session) = self.open_session(self.local_user.clone());
            let viewer = Viewer { login: session.login, from, csrf: session.csrf, signed_in: false };
            return Verdict::Allowed(viewer, Some(id));
        };
        match credential {
            Credential::Bearer(token) => {
                if self.blocked(from) {
                    return Verdict::TooMany;
                }
                match logins.login(token) {
                    Some(login) => {
                        let csrf = hex::encode(Sha256::digest([&self.secret[..], token.as_bytes()].concat()));
                        Verdict::Allowed(Viewer { login: login.into(), from, csrf, signed_in: true }, None)
                    }
                    None => {
                        self.failed(from);
                        Verdict::Refused
                    }
                }
            }
            _ => Verdict::SignIn,
        }
    }

    /// Signing in with a token: a new session's cookie value, or why not.
    pub fn sign_in(&self, token: &str, from: IpAddr) -> Result<String, Verdict> {
        if self.blocked(from) {
            return Err(Verdict::TooMany);
        }
        let Some(login) = self.logins.as_ref().and_then(|l| l.login(token)) else {
            self.failed(from);
            return Err(Verdict::Refused);
        };
        Ok(self.open_session(login.to_string()).0)
    }

    pub fn sign_out(&self, cookie: &str) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(cookie);
    }

    fn open_session(&self, login: String) -> (String, Session) {
        let id = random_hex(32);
        let session = Session { login, csrf: random_hex(32), expires: Instant::now() + SESSION_LIFETIME };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| s.expires > Instant::now());
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions.iter().min_by_key(|(_, s)| s.expires).map(|(id, _)| id.clone());
            sessions.retain(|id, _| Some(id) != oldest.as_ref());
        }
        sessions.insert(id.clone(), session.clone());
        (id, session)
    }

    fn session(&self, id: &str) -> Option<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    fn blocked(&self, from: IpAddr) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let Some(recent) = failures.get_mut(&from) else { return false };
        while recent.front().is_some_and(|at| at.elapsed() > FAILURE_WINDOW) {
            recent.pop_front();
        }
        let blocked = recent.len() >= MAX_FAILURES;
        if recent.is_empty() {
            failures.remove(&from);
        }
        blocked
    }

    fn failed(&self, from: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.entry(from).or_default().push_back(Instant::now());
    }
}

/// Whether two CSRF tokens match, in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes()) && !a.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));

    fn auth() -> Auth {
        let logins = Logins::parse("# operators\nann:0123456789abcdef0123\n\nbob: fedcba9876543210fedc\n").unwrap();
        Auth::new(logins, "root".into())
    }

    #[test]
    fn token_files_are_checked_line_by_line_without_echoing_tokens() {
        let short = Logins::parse("ann:short-secret").err().unwrap();
        assert_eq!(short.0, 1);
        assert!(!short.1.contains("short-secret"), "{}", short.1);
        assert_eq!(Logins::parse("ann:0123456789abcdef0123\njust-a-token-here").err().unwrap().0, 2);
        assert!(Logins::parse("a b:0123456789abcdef0123").is_err());
        assert!(Logins::parse("ann:0123456789abcdef0123\nbob:0123456789abcdef0123").is_err());
        assert!(Logins::parse("# nobody\n").unwrap().is_none());
    }

    #[test]
    fn a_bearer_token_names_its_login_and_a_wrong_one_is_refused_then_rate_limited() {
        let auth = auth();
        match auth.check(Credential::Bearer("fedcba9876543210fedc"), HOST, true) {
            Verdict::Allowed(viewer, cookie) => {
                assert_eq!(viewer.login, "bob");
                assert!(cookie.is_none());
                assert!(!viewer.csrf.contains("fedcba9876543210fedc"));
            }
            _ => panic!("bob's token was refused"),
        }
        assert!(matches!(auth.check(Credential::None, HOST, true), Verdict::SignIn));
        for _ in 0..MAX_FAILURES {
            assert!(matches!(auth.check(Credential::Bearer("wrong-wrong-wrong"), HOST, true), Verdict::Refused));
        }
        // Now even the right token waits.
        assert!(matches!(auth.check(Credential::Bearer("fedcba9876543210fedc"), HOST, true), Verdict::TooMany));
        assert!(matches!(auth.sign_in("0123456789abcdef0123", HOST), Err(Verdict::TooMany)));
        let elsewhere = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 10));
        assert!(auth.sign_in("0123456789abcdef0123", elsewhere).is_ok());
    }

    #[test]
    fn a_session_lasts_until_signed_out() {
        let auth = auth();
        let cookie = auth.sign_in("0123456789abcdef0123", HOST).ok().unwrap();
        let Verdict::Allowed(viewer, None) = auth.check(Credential::Cookie(&cookie), HOST, true) else { panic!() };
        assert_eq!(viewer.login, "ann");
        assert!(viewer.signed_in);
        auth.sign_out(&cookie);
        assert!(matches!(auth.check(Credential::Cookie(&cookie), HOST, true), Verdict::SignIn));
        assert!(matches!(auth.check(Credential::Cookie("made-up"), HOST, true), Verdict::SignIn));
    }

    #[test]
    fn on_loopback_without_tokens_a_browser_gets_a_session_of_this_user() {
        let auth = Auth::new(None, "root".into());
        let Verdict::Allowed(viewer, Some(cookie)) = auth.check(Credential::None, HOST, true) else { panic!() };
        assert_eq!(viewer.login, "root");
        let Verdict::Allowed(again, None) = auth.check(Credential::Cookie(&cookie), HOST, true) else { panic!() };
        assert!(same_token(&again.csrf, &viewer.csrf));
        assert!(!same_token("", ""));
    }
}
