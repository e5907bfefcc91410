//! HTML for the console's pages: every value that comes from a cloud, an image tag or a user
//! goes through [`escape`], and the page skeleton carries the security headers' partner, a
//! script loaded from the console itself (the content security policy allows no inline script).

use std::fmt::Write as _;

/// Text made safe for element content and double- or single-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path segment or query value made safe for a URL (letters, digits and `-._~` pass).
pub fn url_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            other => {
                let _ = write!(out, "%{other:02X}");
            }
        }
    }
    out
}

/// A link whose target and text are both escaped.
pub fn link(href: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", escape(href), escape(text))
}

/// Unix seconds as `2026-12-01 10:00:00Z`.
pub fn time(unix: u64) -> String {
    let stamp = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix));
    stamp.to_string().replace('T', " ")
}

/// How long ago, in the largest unit that fits (`3m`, `2h`, `4d`).
pub fn age(since: u64, now: u64) -> String {
    let secs = now.saturating_sub(since);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// A table: a header row (none when every header is empty, as for name/value facts) and rows
/// of cells already rendered as HTML.
pub fn table(id: &str, headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut out = format!("<table id=\"{}\">", escape(id));
    if headers.iter().any(|h| !h.is_empty()) {
        out.push_str("<thead><tr>");
        for header in headers {
            let _ = write!(out, "<th>{}</th>", escape(header));
        }
        out.push_str("</tr></thead>");
    }
    out.push_str("<tbody>");
    let mut empty = true;
    for row in rows {
        empty = false;
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    if empty {
        let _ = write!(out, "<tr><td colspan=\"{}\" class=\"none\">none</td></tr>", headers.len());
    }
    out.push_str("</tbody></table>");
    out
}

/// A form that posts to `action` with the viewer's CSRF token and the given hidden fields.
pub fn post_form(action: &str, csrf: &str, hidden: &[(&str, &str)], inner: &str) -> String {
    let mut out = format!("<form method=\"post\" action=\"{}\">", escape(action));
    let _ = write!(out, "<input type=\"hidden\" name=\"csrf\" value=\"{}\">", escape(csrf));
    for (name, value) in hidden {
        let _ = write!(out, "<input type=\"hidden\" name=\"{}\" value=\"{}\">", escape(name), escape(value));
    }
    out.push_str(inner);
    out.push_str("</form>");
    out
}

/// Who is looking, as the page header shows it.
pub struct Header<'a> {
    pub login: &'a str,
    pub csrf: &'a str,
    /// Whether signing out means anything (false on loopback without tokens).
    pub signed_in: bool,
    pub provider: &'a str,
}

/// The whole page: navigation, who is signed in, and the body (already HTML).
pub fn page(title: &str, header: &Header, body: &str) -> String {
    let sign_out = match header.signed_in {
        true => post_form("/logout", header.csrf, &[], "<button type=\"submit\">Sign out</button>"),
        false => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title} · bakery console</title><link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/console.js\" defer></script></head><body>\
         <header><nav><a href=\"/\" class=\"brand\">bakery</a> <a href=\"/\">Applications</a> \
         <a href=\"/images\">Images</a></nav><div class=\"who\">{provider} · <span id=\"login\">{login}</span>{sign_out}</div></header>\
         <main><h1>{title}</h1>{body}</main></body></html>",
        title = escape(title),
        provider = escape(header.provider),
        login = escape(header.login),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_becomes_text() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(url_part("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert_eq!(link("/images?app=a&b", "<b>"), "<a href=\"/images?app=a&amp;b\">&lt;b&gt;</a>");
    }

    #[test]
    fn a_table_of_facts_has_no_empty_header_row() {
        let facts = table("image", &["", ""], [vec!["Name".to_string(), "x".to_string()]]);
        assert!(!facts.contains("<thead>"), "{facts}");
        let listed = table("images", &["Image", "App"], Vec::<Vec<String>>::new());
        assert!(listed.contains("<th>Image</th>") && listed.contains("colspan=\"2\""), "{listed}");
    }

    #[test]
    fn ages_use_the_largest_unit() {
        assert_eq!(age(100, 130), "30s");
        assert_eq!(age(0, 7200), "2h");
        assert_eq!(age(0, 3 * 86400 + 5), "3d");
        assert_eq!(age(200, 100), "0s");
    }
}
