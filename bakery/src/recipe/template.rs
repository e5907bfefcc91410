//! `{{ name }}` templates in file contents, commands and tag values.

use super::BUILTIN_VARS;
use std::collections::BTreeMap;

pub(super) fn is_template_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(super) enum Piece<'a> {
    Text(&'a str),
    Name(&'a str),
}

/// Splits a template into literal text and `{{ name }}` references.
pub(super) fn parse_template(text: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        pieces.push(Piece::Text(&rest[..start]));
        let inner = &rest[start + 2..];
        let Some(end) = inner.find("}}") else {
            let excerpt: String = rest[start..].chars().take(20).collect();
            return Err(format!("\"{{{{\" without a closing \"}}}}\" at \"{excerpt}\""));
        };
        let name = inner[..end].trim();
        if !is_template_name(name) {
            return Err(format!("\"{{{{{}}}}}\" is not a template reference", &inner[..end]));
        }
        pieces.push(Piece::Name(name));
        rest = &inner[end + 2..];
    }
    pieces.push(Piece::Text(rest));
    Ok(pieces)
}

pub(super) fn render(text: &str, values: &BTreeMap<&str, &str>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for piece in parse_template(text)? {
        match piece {
            Piece::Text(literal) => out.push_str(literal),
            Piece::Name(name) => match values.get(name) {
                Some(value) => out.push_str(value),
                None if BUILTIN_VARS.contains(&name) => {
                    return Err(format!("no value was given for built-in \"{name}\""));
                }
                None => return Err(format!("unknown template name \"{name}\"")),
            },
        }
    }
    Ok(out)
}
