//! Where a problem's key path (`files[1].mode`) is in a recipe's text, so that a problem can
//! name its line as a compiler would.

use std::ops::Range;
use toml_edit::{ImDocument, Item, TableLike, Value};

#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a dyn TableLike),
    Item(&'a Item),
    Value(&'a Value),
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// `files[1].mode` as `files`, `1`, `mode`.
fn segments(key: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let (name, indexes) = part.split_once('[').map_or((part, ""), |(name, rest)| (name, rest));
        if !name.is_empty() {
            out.push(Segment::Key(name));
        }
        for index in indexes.split('[') {
            if let Ok(index) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(index));
            }
        }
    }
    out
}

fn step<'a>(node: Node<'a>, segment: &Segment) -> Option<(Node<'a>, Option<Range<usize>>)> {
    match *segment {
        Segment::Key(key) => {
            let table: &dyn TableLike = match node {
                Node::Table(table) => table,
                Node::Item(item) => item.as_table_like()?,
                Node::Value(value) => value.as_inline_table()?,
            };
            let item = table.get(key)?;
            let span = table.key(key).and_then(|k| k.span()).or_else(|| item.span());
            Some((Node::Item(item), span))
        }
        Segment::Index(index) => match node {
            Node::Item(Item::ArrayOfTables(tables)) => {
                let table = tables.get(index)?;
                Some((Node::Table(table), table.span()))
            }
            Node::Item(item) => {
                let value = item.as_array()?.get(index)?;
                Some((Node::Value(value), value.span()))
            }
            Node::Value(value) => {
                let value = value.as_array()?.get(index)?;
                Some((Node::Value(value), value.span()))
            }
            Node::Table(_) => None,
        },
    }
}

/// The 1-based line of `key` in `text`, or of the deepest part of it that is there (a missing
/// key's table); None when none of it is, or the text is not TOML.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let document = ImDocument::parse(text).ok()?;
    let mut node = Node::Table(document.as_table());
    let mut found = None;
    for segment in segments(key) {
        let Some((next, span)) = step(node, &segment) else { break };
        node = next;
        found = span.or(found);
    }
    found.map(|span| line_at(text, span.start))
}

/// The 1-based line holding byte `offset`.
pub fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tables_arrays_and_inline_tables_have_lines() {
        let text = "extends = \"base.toml\"\n\
                    commands = [\n  \"a\",\n  \"b\",\n]\n\
                    [package]\ninstall_root = \"/srv\"\n\
                    [[files]]\npath = \"/a\"\n\
                    [[files]]\npath = \"/b\"\nmode = \"0999\"\n\
                    [services]\nenable = [\"x\", { bad = 1 }]\n";
        assert_eq!(line_of(text, "extends"), Some(1));
        assert_eq!(line_of(text, "commands[1]"), Some(4));
        assert_eq!(line_of(text, "package.install_root"), Some(7));
        assert_eq!(line_of(text, "files[1].mode"), Some(12));
        assert_eq!(line_of(text, "services.enable[1].bad"), Some(14));
        assert_eq!(line_of(text, "package.owner"), Some(6), "a missing key: its table's line");
        assert_eq!(line_of(text, "nothing"), None);
        assert_eq!(line_of("not = [toml", "not"), None);
    }
}
