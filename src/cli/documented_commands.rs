//! The documentation stays runnable: every `projector ...` command that README.md and
//! `docs/*.md` quote parses with the binary's own parser, every file they name exists, and every
//! link between them reaches a page and a heading that exist.
//!
//! A command is checked where it is quoted in full: each line of a fenced code block that runs
//! the binary (`projector`, `./projector`, `target/release/projector`, `cargo run --release --`,
//! after any `VAR=value` prefixes), joined across `\` line ends, up to a `|`, `&&`, `;`, `>` or
//! `#`; and each inline code span that does, unless it is a synopsis (`[`, `(`, `|`, `...`).

use std::fs;
use std::path::{Path, PathBuf};

use super::args::{self, Parsed};

/// The documentation pages: README.md and every page of `docs/`.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let docs = fs::read_dir(root.join("docs")).expect("a docs/ folder");
    let mut docs: Vec<PathBuf> = docs
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

fn read(page: &Path) -> String {
    fs::read_to_string(page).unwrap_or_else(|e| panic!("{}: {e}", page.display()))
}

/// A page's name as a reader finds it: `README.md`, `docs/operations.md`.
fn shown(page: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    page.strip_prefix(root)
        .unwrap_or(page)
        .display()
        .to_string()
}

/// A piece of a page: a line of a fenced code block (with its continuations) or the text
/// outside the blocks, each with the number of its first line. `shell` tells a block of shell
/// commands (no language, or `sh`, `bash`, `shell`, `console`) from one of Rust, TOML, SQL...
enum Piece {
    Code {
        line: usize,
        text: String,
        shell: bool,
    },
    Prose {
        line: usize,
        text: String,
    },
}

/// The page cut into code lines (continuations joined) and runs of prose.
fn pieces(text: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut in_block = false;
    let mut shell = false;
    let mut pending: Option<(usize, String)> = None;
    let mut prose: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let fence = line.trim_start().starts_with("```") || line.trim_start().starts_with("~~~");
        if fence {
            in_block = !in_block;
            let language = line.trim_start().trim_start_matches(['`', '~']).trim();
            shell = ["", "sh", "bash", "shell", "console"].contains(&language);
            if let Some((line, text)) = pending.take() {
                pieces.push(Piece::Code { line, text, shell });
            }
            if let Some((line, text)) = prose.take() {
                pieces.push(Piece::Prose { line, text });
            }
            continue;
        }
        if in_block {
            let (start, mut joined) = pending.take().unwrap_or((number, String::new()));
            match line.trim_end().strip_suffix('\\') {
                Some(head) => {
                    joined.push_str(head);
                    joined.push(' ');
                    pending = Some((start, joined));
                }
                None => {
                    joined.push_str(line);
                    pieces.push(Piece::Code {
                        line: start,
                        text: joined,
                        shell,
                    });
                }
            }
        } else {
            let (start, mut joined) = prose.take().unwrap_or((number, String::new()));
            joined.push_str(line);
            joined.push('\n');
            prose = Some((start, joined));
        }
    }
    pieces.extend(pending.map(|(line, text)| Piece::Code { line, text, shell }));
    pieces.extend(prose.map(|(line, text)| Piece::Prose { line, text }));
    pieces
}

/// The inline code spans of a run of prose, each with its line number (a span may wrap).
fn code_spans(first_line: usize, text: &str) -> Vec<(usize, String)> {
    let mut spans = Vec::new();
    let mut rest = text;
    let mut line = first_line;
    while let Some(open) = rest.find('`') {
        line += rest[..open].matches('\n').count();
        let ticks = rest[open..].len() - rest[open..].trim_start_matches('`').len();
        let after = &rest[open + ticks..];
        let Some(close) = after.find(&"`".repeat(ticks)) else {
            break;
        };
        let span = &after[..close];
        spans.push((line, span.split_whitespace().collect::<Vec<_>>().join(" ")));
        line += span.matches('\n').count();
        rest = &after[close + ticks..];
    }
    spans
}

/// A shell word or one of the operators that end a simple command.
#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    /// `|`, `||`, `&&`, `;`, `&`: another command follows.
    Separator,
    /// `>`, `<` or a `#` comment: the rest of the line is not arguments.
    End,
}

/// Splits a line as a POSIX shell would into words (quotes and backslashes honoured; no
/// expansion) and the operators between them.
fn shell_words(line: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                w.extend(chars.by_ref().take_while(|&c| c != '\''));
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' if chars.peek().is_some_and(|n| "\"\\$`".contains(*n)) => {
                            w.extend(chars.next());
                        }
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c if c.is_whitespace() => tokens.extend(word.take().map(Token::Word)),
            '#' if word.is_none() => {
                tokens.push(Token::End);
                return tokens;
            }
            '|' | '&' | ';' => {
                tokens.extend(word.take().map(Token::Word));
                if chars.peek() == Some(&c) {
                    chars.next();
                }
                tokens.push(Token::Separator);
            }
            '>' | '<' => {
                tokens.extend(word.take().map(Token::Word));
                tokens.push(Token::End);
                return tokens;
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    tokens.extend(word.map(Token::Word));
    tokens
}

/// The arguments given to the binary by each command of a line that runs it.
fn projector_invocations(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    for token in shell_words(line.trim_start().trim_start_matches("$ ")) {
        match token {
            Token::Word(word) => commands.last_mut().expect("a command").push(word),
            Token::Separator => commands.push(Vec::new()),
            Token::End => break,
        }
    }
    commands
        .into_iter()
        .filter_map(|words| arguments_of_projector(&words))
        .collect()
}

/// The arguments after the binary, when `words` run it (after any `VAR=value` prefixes).
fn arguments_of_projector(words: &[String]) -> Option<Vec<String>> {
    let is_assignment = |w: &String| {
        w.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
    };
    let words: Vec<&str> = words
        .iter()
        .skip_while(|w| is_assignment(w))
        .map(String::as_str)
        .collect();
    let first = *words.first()?;
    if first == "projector" || first.ends_with("/projector") {
        return Some(words[1..].iter().map(|w| (*w).to_owned()).collect());
    }
    if words.starts_with(&["cargo", "run"]) {
        let dashes = words.iter().position(|w| *w == "--")?;
        return Some(
            words[dashes + 1..]
                .iter()
                .map(|w| (*w).to_owned())
                .collect(),
        );
    }
    None
}

/// Why `arguments` do not parse as the binary parses them, if they do not.
fn parse_error(arguments: &[String]) -> Option<String> {
    let mut line = vec!["projector".to_owned()];
    line.extend_from_slice(arguments);
    match args::parse(&line) {
        Ok(_) | Err(Parsed::Help(_)) => None,
        Err(Parsed::Usage(text)) => Some(text.trim_end().to_owned()),
    }
}

/// Whether an inline span shows a command's form rather than a command to run.
fn is_synopsis(span: &str) -> bool {
    ["[", "(", "|", "...", "…"].iter().any(|mark| span.contains(mark))
        // The `application_name` a process sets, not a command.
        || span.starts_with("projector pid")
}

/// Every command quoted by a page, as (line, the quote, its arguments).
///
/// Inline spans without flags name a (sub)command rather than run it; they are checked with
/// `--help`, which parses when the words are the binary's subcommands.
fn quoted_commands(text: &str) -> Vec<(usize, String, Vec<String>)> {
    let mut commands = Vec::new();
    for piece in pieces(text) {
        match piece {
            Piece::Code { shell: false, .. } => {}
            Piece::Code { line, text, .. } => {
                for arguments in projector_invocations(&text) {
                    commands.push((line, text.trim().to_owned(), arguments));
                }
            }
            Piece::Prose { line, text } => {
                for (line, span) in code_spans(line, &text) {
                    if is_synopsis(&span) {
                        continue;
                    }
                    for mut arguments in projector_invocations(&span) {
                        // A span without flags names a command (`projector repartition`): it
                        // must exist, and shows its help.
                        if !arguments.iter().any(|a| a.starts_with('-')) {
                            arguments.push("--help".to_owned());
                        }
                        commands.push((line, span.clone(), arguments));
                    }
                }
            }
        }
    }
    commands
}

#[test]
fn every_command_the_docs_quote_parses() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for page in pages() {
        for (line, quote, arguments) in quoted_commands(&read(&page)) {
            checked += 1;
            if let Some(error) = parse_error(&arguments) {
                failures.push(format!("{}:{line}: `{quote}`: {error}", shown(&page)));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "commands quoted in the docs that the binary would refuse:\n{}",
        failures.join("\n")
    );
    assert!(checked > 50, "only {checked} commands found in the docs");
}

/// The repository paths a page names (`scripts/run-all.sh`, `examples/sql/...`), by line.
fn named_paths(text: &str) -> Vec<(usize, String)> {
    const FOLDERS: [&str; 6] = [
        "scripts/",
        "examples/",
        "sql/",
        "tests/",
        "benches/",
        "docs/",
    ];
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let mut paths = Vec::new();
    for (index, line) in text.lines().enumerate() {
        for word in line.split(|c: char| !is_path_char(c)) {
            let word = word.trim_end_matches('.');
            let at_root = FOLDERS.iter().any(|folder| word.starts_with(folder));
            if at_root && !word.contains("..") && word.len() > word.find('/').unwrap_or(0) + 1 {
                paths.push((index + 1, word.to_owned()));
            }
        }
    }
    paths.dedup();
    paths
}

#[test]
fn every_script_and_file_the_docs_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = Vec::new();
    let mut scripts = 0;
    for page in pages() {
        for (line, path) in named_paths(&read(&page)) {
            scripts += usize::from(path.starts_with("scripts/") && path.ends_with(".sh"));
            if !root.join(&path).exists() {
                missing.push(format!("{}:{line}: {path}", shown(&page)));
            }
        }
    }
    assert!(scripts > 5, "only {scripts} scripts named in the docs");
    assert!(
        missing.is_empty(),
        "files named in the docs that do not exist:\n{}",
        missing.join("\n")
    );
}

/// The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces as `-`.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a page's headings.
fn anchors(text: &str) -> Vec<String> {
    pieces(text)
        .iter()
        .filter_map(|piece| match piece {
            Piece::Prose { text, .. } => Some(text),
            Piece::Code { .. } => None,
        })
        .flat_map(|text| text.lines())
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| anchor_of(heading.trim_start_matches('#')))
        .collect()
}

/// The relative links of a page (`[text](target)`), by line.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let target = &rest[at + 2..];
            let end = target.find(')').unwrap_or(target.len());
            let link = &target[..end];
            if !link.contains("://") && !link.starts_with("mailto:") {
                links.push((index + 1, link.to_owned()));
            }
            rest = &target[end..];
        }
    }
    links
}

#[test]
fn every_link_between_the_docs_reaches_a_page_and_heading() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = read(&page);
        for (line, link) in links(&text) {
            let (path, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if path.is_empty() {
                page.clone()
            } else {
                page.parent().expect("a folder").join(path)
            };
            let found = match (target.exists(), anchor) {
                (false, _) => false,
                (true, "") => true,
                (true, anchor) => anchors(&read(&target)).iter().any(|a| a == anchor),
            };
            if !found {
                broken.push(format!("{}:{line}: {link}", shown(&page)));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links in the docs to no page or heading:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_readme_links_every_docs_page_and_each_links_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = read(&root.join("README.md"));
    for page in pages().iter().skip(1) {
        let name = shown(page);
        assert!(
            readme.contains(&format!("]({name}")),
            "README.md does not link {name}"
        );
        let back = if name == "docs/README.md" {
            "](../README.md"
        } else {
            "](README.md"
        };
        assert!(
            read(page).contains(back),
            "{name} does not link back ({back})"
        );
    }
}

#[test]
fn commands_are_read_as_a_shell_reads_them() {
    let line = "DATABASE_URL=postgres://x/db target/release/projector dead-letters drop \
                --aggregate 'it'\\''s here' --yes | tee log # note";
    assert_eq!(
        projector_invocations(line),
        [["dead-letters", "drop", "--aggregate", "it's here", "--yes"]]
    );
    assert_eq!(
        projector_invocations("projector migrate && cargo run --release -- status --json > s"),
        [vec!["migrate"], vec!["status", "--json"]]
    );
    assert!(projector_invocations("scripts/run-all.sh 4").is_empty());
    let text = "```sh\nprojector status \\\n  --json\n```\nsee `projector seed\n--users 5`\n";
    let commands = quoted_commands(text);
    let lines: Vec<_> = commands
        .iter()
        .map(|(line, _, args)| (*line, args.clone()))
        .collect();
    assert_eq!(
        lines,
        [
            (2, vec!["status".to_owned(), "--json".to_owned()]),
            (
                5,
                vec!["seed".to_owned(), "--users".to_owned(), "5".to_owned()]
            )
        ]
    );
    assert!(parse_error(&["--no-such-flag".to_owned()]).is_some());
}
