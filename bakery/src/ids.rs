//! Resource identifiers shaped like AWS ones (`ami-` + 17 hex digits), so that local and
//! AWS images look alike to everything downstream (the launcher, tags, scripts).

use rand::Rng;

/// A new random identifier such as `ami-0f3c9a1b2d4e5f607`.
pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let digits: String = (0..17).map(|_| char::from_digit(rng.gen_range(0..16), 16).expect("digit below 16")).collect();
    format!("{prefix}-{digits}")
}

/// Whether `text` is an identifier with this prefix (`ami`, `snap`, `vol`, …).
pub fn is_id(prefix: &str, text: &str) -> bool {
    text.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| hex.len() == 17 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Now in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Now as an RFC 3339 UTC timestamp with second precision, the format EC2 uses for CreationDate.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_aws_shape() {
        let id = new_id("ami");
        assert!(is_id("ami", &id), "{id}");
        assert!(!is_id("snap", &id));
        assert!(!is_id("ami", "ami-123"));
        assert!(!is_id("ami", "ami-0123456789abcdefg"));
    }
}
