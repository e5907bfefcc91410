//! Debian's control-file format (deb822), as apt's `.sources` files, dpkg's status database and
//! a package's control fields use it: stanzas separated by blank lines, `Name: value` fields
//! (names compare without case) continued on lines that start with white space.

/// The value of field `name` in `stanza` (its first line, trimmed); None when it has none.
pub fn field(stanza: &str, name: &str) -> Option<String> {
    stanza.lines().find_map(|line| {
        if line.starts_with([' ', '\t']) {
            return None;
        }
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_by_name_and_continuations_are_not_fields() {
        let stanza = "Package: hello\nDescription: a line\n Version: not a field\nversion: 1.0\n";
        assert_eq!(field(stanza, "package").as_deref(), Some("hello"));
        assert_eq!(field(stanza, "Version").as_deref(), Some("1.0"));
        assert_eq!(field(stanza, "Depends"), None);
    }
}
