//! What a standard base is built from upstream: the signed Release file (InRelease) of each of
//! this host's Debian sources for the base's suite. A security update changes the suite's
//! InRelease, so its digest, kept with the cache key, makes the next `bakery base build` build
//! anew; `--offline` does without it.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// A Release file is a few hundred KiB; this bounds a misbehaving server.
const RELEASE_LIMIT: u64 = 16 << 20;

/// A Debian archive and one suite of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suite: String,
}

/// The host's Debian sources (deb822 `.sources` or one-line `.list` files under `etc_apt`) for
/// `suite` and its `-updates` and `-security` suites, as the base builder uses them: enabled,
/// binary, and signed by Debian's archive key or by nothing named.
pub fn host_sources(etc_apt: &Path, suite: &str) -> Vec<Source> {
    let wanted = |s: &str| s == suite || s == format!("{suite}-updates") || s == format!("{suite}-security");
    let mut files: Vec<_> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .collect();
    files.sort();
    files.insert(0, etc_apt.join("sources.list"));
    let mut sources = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        let mut add = |uris: &str, suites: &str| {
            for uri in uris.split_whitespace() {
                for suite in suites.split_whitespace().filter(|s| wanted(s)) {
                    sources.push(Source { uri: uri.trim_end_matches('/').to_string(), suite: suite.to_string() });
                }
            }
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => {
                for stanza in text.split("\n\n") {
                    let field = |name: &str| crate::deb822::field(stanza, name);
                    let enabled = field("Enabled").is_none_or(|e| !e.eq_ignore_ascii_case("no"));
                    let binary = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
                    let debian = field("Signed-By").is_none_or(|key| key.contains("debian-archive"));
                    if enabled && binary && debian {
                        add(&field("URIs").unwrap_or_default(), &field("Suites").unwrap_or_default());
                    }
                }
            }
            Some("list") => {
                for line in text.lines().map(str::trim).filter(|l| l.starts_with("deb ")) {
                    let rest = line.trim_start_matches("deb ").trim_start();
                    let rest = match rest.strip_prefix('[') {
                        Some(options) => options.split_once(']').map_or("", |(_, rest)| rest),
                        None => rest,
                    };
                    let options = line.split_once('[').and_then(|(_, rest)| rest.split_once(']')).map(|(o, _)| o);
                    let signed_by =
                        options.into_iter().flat_map(str::split_whitespace).find_map(|o| o.strip_prefix("signed-by="));
                    if signed_by.is_some_and(|key| !key.contains("debian-archive")) {
                        continue;
                    }
                    let mut words = rest.split_whitespace();
                    if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
                        add(uri, suite);
                    }
                }
            }
            _ => {}
        }
    }
    sources
}

/// SHA-256 over each source's InRelease (or Release), in order; an error names the source.
pub fn identity(sources: &[Source]) -> Result<String, String> {
    if sources.is_empty() {
        return Err("no Debian apt source on this host for the suite".into());
    }
    let agent =
        ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).timeout(Duration::from_secs(60)).build();
    let mut hasher = Sha256::new();
    for source in sources {
        let base = format!("{}/dists/{}", source.uri, source.suite);
        let fetch = |name: &str| -> Result<Vec<u8>, String> {
            let url = format!("{base}/{name}");
            let response = agent.get(&url).call().map_err(|e| format!("cannot read {url}: {e}"))?;
            let mut body = Vec::new();
            response
                .into_reader()
                .take(RELEASE_LIMIT)
                .read_to_end(&mut body)
                .map_err(|e| format!("cannot read {url}: {e}"))?;
            Ok(body)
        };
        let body = fetch("InRelease").or_else(|_| fetch("Release"))?;
        hasher.update(source.uri.as_bytes());
        hasher.update(source.suite.as_bytes());
        hasher.update(Sha256::digest(&body));
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    #[test]
    fn the_host_s_debian_sources_for_the_suite() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::create_dir(etc.path().join("sources.list.d")).unwrap();
        std::fs::write(
            etc.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.invalid/debian/\nSuites: bookworm bookworm-updates trixie\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
             Types: deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n\n\
             Types: deb\nURIs: http://off.invalid/\nSuites: bookworm\nEnabled: no\n",
        )
        .unwrap();
        std::fs::write(
            etc.path().join("sources.list.d/vendor.sources"),
            "Types: deb\nURIs: https://vendor.invalid\nSuites: bookworm\nSigned-By: /etc/apt/keyrings/vendor.gpg\n",
        )
        .unwrap();
        std::fs::write(
            etc.path().join("sources.list"),
            "# comment\ndeb [arch=amd64] http://old.invalid/debian bookworm main\n\
             deb [signed-by=/etc/apt/keyrings/vendor.gpg] http://vendor.invalid/apt bookworm main\n",
        )
        .unwrap();
        let found: Vec<(String, String)> =
            host_sources(etc.path(), "bookworm").into_iter().map(|s| (s.uri, s.suite)).collect();
        let expected = [
            ("http://old.invalid/debian", "bookworm"),
            ("http://mirror.invalid/debian", "bookworm"),
            ("http://mirror.invalid/debian", "bookworm-updates"),
            ("http://mirror.invalid/debian-security", "bookworm-security"),
        ];
        assert_eq!(found, expected.map(|(u, s)| (u.to_string(), s.to_string())));
    }

    #[test]
    fn a_new_release_is_a_new_identity() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}/debian", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let mut stream = stream.unwrap();
                let mut line = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                reader.read_line(&mut line).unwrap();
                while reader.read_line(&mut String::new()).unwrap() > 2 {}
                let body = if n < 2 { "Date: Mon, 01 Dec 2026\n" } else { "Date: Tue, 02 Dec 2026\n" };
                write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                    .unwrap();
            }
        });
        let sources = [Source { uri, suite: "bookworm".into() }];
        let first = identity(&sources).unwrap();
        assert_eq!(identity(&sources).unwrap(), first, "the same Release, the same identity");
        assert_ne!(identity(&sources).unwrap(), first, "a new Release, a new identity");
        assert!(identity(&[]).is_err());
    }
}
