//! The CI examples (examples/ci) run bakery and launcher: each command there must exist with
//! every flag it passes, so the examples cannot go stale as the command lines change.

use std::path::Path;
use std::process::Command;

/// Every `bakery …` and `launcher …` command in `text`, as words: continuation lines joined,
/// cut at a redirection, `||`, or the end of a quoted shell string.
fn commands(text: &str) -> Vec<Vec<String>> {
    let joined = text.replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") || trimmed.starts_with('#') {
            continue;
        }
        for program in ["bakery", "launcher"] {
            let Some(start) = line.find(&format!("{program} ")) else { continue };
            let before = line[..start].chars().last();
            if before.is_some_and(|c| !matches!(c, ' ' | '\'' | '"' | '(' | ':')) {
                continue;
            }
            let rest = &line[start..];
            let end = rest.find(['>', '\'']).unwrap_or(rest.len()).min(rest.find("||").unwrap_or(rest.len()));
            found.push(words(&rest[..end]));
        }
    }
    found
}

/// Shell words, double quotes removed.
fn words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[test]
fn every_command_in_the_ci_examples_exists_with_its_flags() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ci");
    let mut checked = 0;
    for file in ["Jenkinsfile", "github-actions.yml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let found = commands(&text);
        assert!(found.len() >= 6, "{file}: {found:?}");
        for command in found {
            let binary = match command[0].as_str() {
                "bakery" => env!("CARGO_BIN_EXE_bakery"),
                _ => env!("CARGO_BIN_EXE_launcher"),
            };
            // clap answers --help for the subcommand the words before the first flag name.
            let path: Vec<&String> = command[1..].iter().take_while(|w| !w.starts_with('-')).collect();
            let help = Command::new(binary).args(&path).arg("--help").output().unwrap();
            assert!(help.status.success(), "{file}: `{}` is not a command", command.join(" "));
            let help = String::from_utf8_lossy(&help.stdout);
            for flag in command.iter().filter(|w| w.starts_with("--")) {
                assert!(
                    help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                    "{file}: `{}` has no {flag}",
                    command.join(" ")
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 12);
}

#[test]
fn the_command_finder_finds_commands_and_their_flags() {
    let text = "// where bakery is installed\nsh 'bakery gc'\n  bakery bake --base b \\\n    --app \"$APP\" > out.json\nrun: launcher rollback --cluster c || true\nnot-bakery x\n";
    let found = commands(text);
    assert_eq!(
        found,
        [
            vec!["bakery", "gc"],
            vec!["bakery", "bake", "--base", "b", "--app", "$APP"],
            vec!["launcher", "rollback", "--cluster", "c"]
        ]
    );
}
