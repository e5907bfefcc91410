//! A group's user data: the team's own (a script or cloud-config) and the launcher's (the
//! `KEY='value'` lines the image's agent reads) side by side, neither over the other.
//!
//! With only one of the two the user data is that one, as given (the launcher's lines alone are
//! what the agent has always read). With both, it is a MIME multipart that cloud-init runs: the team's part verbatim under the
//! content type its first line names, then the launcher's as `text/x-bakery-env` (which
//! cloud-init skips and the agent picks out). A new group copies its ancestor's team part and
//! writes its own launcher part, so a registry that moved or a deploy without one never carries
//! stale lines.

use sha2::{Digest, Sha256};

const OURS: &str = "text/x-bakery-env";

/// Why the team's user data cannot sit beside the launcher's part, if it cannot: a MIME
/// multipart of its own or gzip would stop being read by cloud-init once wrapped in ours.
pub(super) fn unmergeable(team: &[u8]) -> Option<&'static str> {
    if team.starts_with(&[0x1f, 0x8b]) {
        Some("the team's user data is gzip-compressed; give it uncompressed to go beside the launcher's registry part")
    } else if team.starts_with(b"Content-Type:") || team.starts_with(b"MIME-Version:") {
        Some("the team's user data is a MIME message of its own; give its script or cloud-config to go beside the launcher's registry part")
    } else {
        None
    }
}

/// The user data for a group: `team` (verbatim) beside `ours`; None when both are absent.
pub(super) fn merge(team: Option<&[u8]>, ours: Option<&str>) -> Result<Option<Vec<u8>>, &'static str> {
    let (team, ours) = match (team, ours) {
        (Some(team), Some(ours)) => (team, ours),
        (team, ours) => return Ok(team.map(<[u8]>::to_vec).or(ours.map(|o| o.as_bytes().to_vec()))),
    };
    if let Some(problem) = unmergeable(team) {
        return Err(problem);
    }
    let boundary = format!("==bakery-{}==", &hex::encode(Sha256::digest(team))[..16]);
    let mut out = format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n").into_bytes();
    let part = |content_type: &str| {
        format!("--{boundary}\nContent-Type: {content_type}; charset=\"utf-8\"\nMIME-Version: 1.0\n\n")
    };
    out.extend(part(content_type(team)).bytes());
    out.extend_from_slice(team);
    out.extend(format!("\n{}{ours}\n--{boundary}--\n", part(OURS)).bytes());
    Ok(Some(out))
}

/// The team's part of a group's user data, exactly as it was given; None when there is only the
/// launcher's.
pub(super) fn team_part(data: &[u8]) -> Option<Vec<u8>> {
    let Some(boundary) = our_boundary(data) else {
        // The launcher's lines alone start with REGISTRY_URL; anything else is the team's.
        return (!data.is_empty() && !data.starts_with(b"REGISTRY_URL=")).then(|| data.to_vec());
    };
    let first = find(data, format!("--{boundary}\n").as_bytes())?;
    let part = &data[first..];
    let body = &part[find(part, b"\n\n")? + 2..];
    // The newline before a delimiter belongs to the delimiter: merge added it after the team's.
    let end = find(body, format!("\n--{boundary}").as_bytes())?;
    Some(body[..end].to_vec())
}

/// The boundary `merge` chose, when `data` is one of its multiparts.
fn our_boundary(data: &[u8]) -> Option<String> {
    let header = std::str::from_utf8(&data[..data.len().min(200)]).ok()?;
    let rest = header.strip_prefix("Content-Type: multipart/mixed; boundary=\"==bakery-")?;
    let (digest, _) = rest.split_once("==\"")?;
    Some(format!("==bakery-{digest}=="))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What cloud-init should take the team's part for, by its first line.
fn content_type(team: &[u8]) -> &'static str {
    let starts = |prefix: &str| team.starts_with(prefix.as_bytes());
    if starts("#!") {
        "text/x-shellscript"
    } else if starts("#cloud-config") {
        "text/cloud-config"
    } else if starts("#cloud-boothook") {
        "text/cloud-boothook"
    } else if starts("#include") {
        "text/x-include-url"
    } else {
        "text/plain"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_team_part_survives_a_merge_byte_for_byte() {
        let ours = "REGISTRY_URL='cloudmap:srv-1'\nGROUP='hello-v001'\n";
        for team in [&b"#!/bin/sh\necho hi\n"[..], b"#cloud-config\nruncmd: [true]", b"\n\nodd\n\n", b"x"] {
            let merged = merge(Some(team), Some(ours)).unwrap().unwrap();
            let text = String::from_utf8(merged.clone()).unwrap();
            assert!(text.contains("Content-Type: text/x-bakery-env") && text.contains(ours), "{text}");
            assert_eq!(team_part(&merged).as_deref(), Some(team), "{text}");
            let without_ours = merge(Some(team), None).unwrap().unwrap();
            assert_eq!(team_part(&without_ours).as_deref(), Some(team));
        }
        assert!(String::from_utf8(merge(Some(b"#!/bin/sh\n"), Some(ours)).unwrap().unwrap())
            .unwrap()
            .contains("Content-Type: text/x-shellscript"));
    }

    #[test]
    fn the_launchers_lines_alone_are_no_team_part() {
        let ours = "REGISTRY_URL='cloudmap:srv-1'\n";
        assert_eq!(merge(None, Some(ours)).unwrap().as_deref(), Some(ours.as_bytes()));
        assert_eq!(team_part(ours.as_bytes()), None);
        assert_eq!(team_part(b""), None);
        assert_eq!(merge(None, None), Ok(None));
        // A team's own multipart is the team's, alone; beside ours cloud-init would skip it.
        let theirs = b"Content-Type: multipart/mixed; boundary=\"x\"\n\n--x\n\nhi\n--x--\n";
        assert_eq!(team_part(theirs).as_deref(), Some(&theirs[..]));
        assert_eq!(merge(Some(theirs), None), Ok(Some(theirs.to_vec())));
        assert!(merge(Some(theirs), Some(ours)).unwrap_err().contains("MIME message"));
        assert!(merge(Some(&[0x1f, 0x8b, 8]), Some(ours)).unwrap_err().contains("gzip"));
    }
}
