//! A projection file, read and parsed: a header (`-- projection: NAME`, optional `-- scope:`
//! and `-- on-poison:`), then the `setup`, `apply` and `reset` sections. Nothing is checked
//! against the database here (see `SqlProjection::check`).

use std::path::Path;
use std::sync::Arc;

use crate::Error;
use crate::event::Scope;
use crate::projections::SqlProjection;
use crate::projections::projection::PoisonPolicy;

#[derive(Debug)]
pub(super) struct SqlFile {
    /// The file's path, as given, for messages.
    pub(super) path: String,
    pub(super) name: String,
    pub(super) scope: Scope,
    /// `-- on-poison:`, stop when not given.
    pub(super) poison: PoisonPolicy,
    /// `-- version:`, 1 when not given.
    pub(super) version: u32,
    pub(super) setup: Option<Section>,
    pub(super) apply: Section,
    pub(super) reset: Option<Section>,
}

/// One section's statements, exactly as written (comments included).
#[derive(Debug)]
pub(super) struct Section {
    /// `setup`, `apply` or `reset`.
    pub(super) name: &'static str,
    /// The line of the file where the section's text starts (1-based).
    pub(super) first_line: usize,
    pub(super) sql: String,
}

const SECTIONS: [&str; 3] = ["setup", "apply", "reset"];

impl SqlProjection {
    /// Reads and parses the file at `path`; nothing is checked against the database yet (see
    /// [`check`](Self::check)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<SqlProjection, Error> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| Error::SqlProjectionFile {
            file: shown.clone(),
            section: None,
            line: None,
            reason: format!("cannot be read ({error}): check the path"),
        })?;
        SqlProjection::parse(&shown, &text)
    }

    /// Parses the text of a projection file; `path` names it in messages.
    pub fn parse(path: &str, text: &str) -> Result<SqlProjection, Error> {
        // A byte-order mark some editors write is not part of the first line.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let refuse =
            |line: Option<usize>, section: Option<&str>, reason: String| Error::SqlProjectionFile {
                file: path.to_owned(),
                section: section.map(str::to_owned),
                line,
                reason,
            };
        let mut name: Option<String> = None;
        let mut scope: Option<Scope> = None;
        let mut poison: Option<PoisonPolicy> = None;
        let mut version: Option<u32> = None;
        let mut sections: Vec<Section> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            match directive(line) {
                Some(Directive::Section(section)) => {
                    if sections.iter().any(|s| s.name == section) {
                        return Err(refuse(
                            Some(number),
                            Some(section),
                            format!("a second `-- {section}` section: give each section once"),
                        ));
                    }
                    sections.push(Section {
                        name: section,
                        first_line: number + 1,
                        sql: String::new(),
                    });
                }
                Some(Directive::Header(key, value)) => {
                    if !sections.is_empty() {
                        return Err(refuse(
                            Some(number),
                            None,
                            format!(
                                "`-- {key}:` comes after a section: put the header lines first"
                            ),
                        ));
                    }
                    if key == "projection" {
                        if name.is_some() {
                            return Err(refuse(
                                Some(number),
                                None,
                                "a second `-- projection:` line".into(),
                            ));
                        }
                        if value.is_empty() {
                            return Err(refuse(
                                Some(number),
                                None,
                                "`-- projection:` needs a name, such as `-- projection: \
                                 order-totals`"
                                    .into(),
                            ));
                        }
                        if value.contains([',', '=']) {
                            return Err(refuse(
                                Some(number),
                                None,
                                format!(
                                    "the name `{value}` holds `,` or `=`, which the \
                                     `--projection` and `--on-poison` lists split on: choose \
                                     another"
                                ),
                            ));
                        }
                        name = Some(value.to_owned());
                    } else if key == "version" {
                        if version.is_some() {
                            return Err(refuse(
                                Some(number),
                                None,
                                "a second `-- version:` line".into(),
                            ));
                        }
                        version = Some(value.parse::<u32>().ok().filter(|&v| v >= 1).ok_or_else(
                            || {
                                refuse(
                                    Some(number),
                                    None,
                                    format!(
                                        "`-- version: {value}`: expected a whole number from 1 \
                                         (each version builds its own read model; see \
                                         docs/operations.md#versions)"
                                    ),
                                )
                            },
                        )?);
                    } else if key == "on-poison" {
                        if poison.is_some() {
                            return Err(refuse(
                                Some(number),
                                None,
                                "a second `-- on-poison:` line".into(),
                            ));
                        }
                        poison =
                            Some(PoisonPolicy::parse("-- on-poison:", value).map_err(|_| {
                                refuse(
                                    Some(number),
                                    None,
                                    format!(
                                        "`-- on-poison: {value}`: expected stop (the projection \
                                         stops just before an event that keeps failing) or park \
                                         (the event and the later events of its aggregate are \
                                         parked, the others go on)"
                                    ),
                                )
                            })?);
                    } else {
                        if scope.is_some() {
                            return Err(refuse(
                                Some(number),
                                None,
                                "a second `-- scope:` line: give every list on one line, \
                                 separated by `;`"
                                    .into(),
                            ));
                        }
                        scope = Some(
                            parse_scope(value)
                                .map_err(|reason| refuse(Some(number), Some("scope"), reason))?,
                        );
                    }
                }
                None => {
                    if let Some(meant) = misspelt_directive(line) {
                        return Err(refuse(
                            Some(number),
                            None,
                            format!(
                                "`{}` looks like a misspelt `-- {meant}`: the sections are \
                                 `-- setup`, `-- apply` and `-- reset`, the headers \
                                 `-- projection:`, `-- scope:`, `-- on-poison:` and `-- version:`; write it \
                                 exactly so, or reword the comment",
                                line.trim()
                            ),
                        ));
                    }
                    match sections.last_mut() {
                        Some(section) => {
                            section.sql.push_str(line);
                            section.sql.push('\n');
                        }
                        None if is_blank_or_comment(line) => {}
                        None => {
                            return Err(refuse(
                                Some(number),
                                None,
                                "SQL before the first section: put statements under `-- setup`, \
                                 `-- apply` or `-- reset`"
                                    .into(),
                            ));
                        }
                    }
                }
            }
        }
        let Some(name) = name else {
            return Err(refuse(
                None,
                None,
                "no `-- projection: NAME` line: the file must start by naming its projection"
                    .into(),
            ));
        };
        let mut take = |wanted: &str| {
            sections
                .iter()
                .position(|s| s.name == wanted)
                .map(|at| sections.swap_remove(at))
        };
        let (setup, apply, reset) = (take("setup"), take("apply"), take("reset"));
        let Some(apply) = apply else {
            return Err(refuse(
                None,
                Some("apply"),
                "no `-- apply` section: add one with the statement(s) that apply a batch of \
                 events, read from the relation `batch`"
                    .into(),
            ));
        };
        if apply.sql.lines().all(is_blank_or_comment) {
            return Err(refuse(
                Some(apply.first_line - 1),
                Some("apply"),
                "the `-- apply` section is empty: give the statement(s) that apply a batch of \
                 events, read from the relation `batch`"
                    .into(),
            ));
        }
        Ok(SqlProjection {
            file: Arc::new(SqlFile {
                path: path.to_owned(),
                name,
                scope: scope.unwrap_or_else(Scope::all),
                poison: poison.unwrap_or_default(),
                version: version.unwrap_or(1),
                setup,
                apply,
                reset,
            }),
        })
    }
}

enum Directive<'a> {
    Section(&'static str),
    Header(&'static str, &'a str),
}

/// A header (`-- projection: NAME`, `-- scope: ...`, `-- on-poison: park`) or section
/// (`-- apply`) line.
fn directive(line: &str) -> Option<Directive<'_>> {
    let comment = line.trim().strip_prefix("--")?.trim();
    if let Some(section) = SECTIONS
        .into_iter()
        .find(|s| comment.eq_ignore_ascii_case(s))
    {
        return Some(Directive::Section(section));
    }
    let (key, value) = comment.split_once(':')?;
    let key = key.trim().to_ascii_lowercase();
    HEADERS
        .into_iter()
        .find(|k| *k == key)
        .map(|k| Directive::Header(k, value.trim()))
}

/// The headers a file may have.
const HEADERS: [&str; 4] = ["projection", "scope", "on-poison", "version"];

/// For a comment line that is not a directive but reads like one (`-- rest`, `-- on_poison:
/// park`, `-- apply:`), the directive it is close to. Kept as SQL, it would silently run a
/// `reset` section's statements inside `apply`, or drop a header.
fn misspelt_directive(line: &str) -> Option<&'static str> {
    let comment = line.trim().strip_prefix("--")?.trim();
    let word = comment
        .split_once(':')
        .map_or(comment, |(key, _)| key)
        .trim();
    if word.is_empty()
        || !word
            .chars()
            .all(|c| c.is_ascii_alphabetic() || c == '-' || c == '_')
    {
        return None;
    }
    let word = word.to_ascii_lowercase().replace('_', "-");
    SECTIONS
        .into_iter()
        .chain(HEADERS)
        .find(|known| edit_distance(&word, known) <= 2)
}

/// The number of single-character insertions, deletions and substitutions from `a` to `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

fn is_blank_or_comment(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with("--")
}

/// `event_types = A, B; aggregate_types = C; bounded_contexts = D`.
fn parse_scope(text: &str) -> Result<Scope, String> {
    let mut scope = Scope::all();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, names)) = part.split_once('=') else {
            return Err(format!(
                "`{part}` is not `LIST = NAME, NAME`: write, for example, `-- scope: \
                 event_types = Deposited, Withdrawn; aggregate_types = Account`"
            ));
        };
        let names: Vec<&str> = names
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            return Err(format!("`{}` lists no names", key.trim()));
        }
        scope = match key.trim() {
            "event_types" => scope.event_types(names),
            "aggregate_types" => scope.aggregate_types(names),
            "bounded_contexts" => scope.bounded_contexts(names),
            other => {
                return Err(format!(
                    "unknown list `{other}`: the lists are event_types, aggregate_types and \
                     bounded_contexts"
                ));
            }
        };
    }
    if scope.is_all() {
        return Err("`-- scope:` lists nothing: drop the line to take every event".into());
    }
    Ok(scope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projections::projection::Projection;

    const GOOD: &str = "-- projection: totals\n\
        -- scope: event_types = A, B; aggregate_types = X\n\
        -- a comment\n\
        -- setup\n\
        CREATE TABLE IF NOT EXISTS t (n INT);\n\
        -- apply\n\
        INSERT INTO t SELECT 1 FROM batch;\n\
        -- reset\n\
        TRUNCATE t;\n";

    #[test]
    fn a_file_is_split_into_its_header_and_sections() {
        let parsed = SqlProjection::parse("f.sql", GOOD).expect("parses");
        assert_eq!(parsed.name(), "totals");
        assert_eq!(
            parsed.scope(),
            Scope::all().event_types(["A", "B"]).aggregate_types(["X"])
        );
        assert_eq!(parsed.poison_policy(), PoisonPolicy::Stop);
        let file = &parsed.file;
        assert_eq!(file.apply.sql, "INSERT INTO t SELECT 1 FROM batch;\n");
        assert_eq!(file.apply.first_line, 7);
        let parking =
            SqlProjection::parse("f.sql", &GOOD.replace("-- a comment", "-- on-poison: park"))
                .expect("parses");
        assert_eq!(parking.poison_policy(), PoisonPolicy::Park);
        assert!(file.setup.is_some() && file.reset.is_some());
    }

    #[test]
    fn bad_files_are_refused_naming_what_is_wrong() {
        let refused = |text: &str| match SqlProjection::parse("f.sql", text) {
            Err(error) => error.to_string(),
            Ok(_) => panic!("accepted: {text}"),
        };
        assert!(refused("-- projection: p\n-- setup\nSELECT 1;\n").contains("no `-- apply`"));
        assert!(refused("-- apply\nSELECT 1;\n").contains("no `-- projection: NAME`"));
        assert!(refused("-- projection: p\n-- apply\n-- nothing\n").contains("is empty"));
        assert!(refused("-- projection: p\nSELECT 1;\n-- apply\nSELECT 1;\n").contains("line 2"));
        assert!(
            refused("-- projection: p\n-- scope: types = A\n-- apply\nSELECT 1;\n")
                .contains("unknown list `types`")
        );
        assert!(
            refused("-- projection: p\n-- apply\nSELECT 1;\n-- apply\nSELECT 2;\n")
                .contains("a second `-- apply`")
        );
        assert!(
            refused("-- projection: p\n-- on-poison: skip\n-- apply\nSELECT 1;\n")
                .contains("`-- on-poison: skip`: expected stop")
        );
        // Misspelt directives would otherwise be kept as SQL (a reset run in every apply).
        let typo = refused("-- projection: p\n-- apply\nSELECT 1;\n-- rest\nTRUNCATE t;\n");
        assert!(
            typo.contains("line 4") && typo.contains("misspelt `-- reset`"),
            "{typo}"
        );
        assert!(
            refused("-- projection: p\n-- on_poison: park\n-- apply\nSELECT 1;\n")
                .contains("misspelt `-- on-poison`")
        );
        assert!(refused("-- projection: a,b\n-- apply\nSELECT 1;\n").contains("holds `,` or `=`"));
    }

    #[test]
    fn comments_a_bom_and_windows_line_ends_are_fine() {
        let text = "\u{feff}-- projection: p\r\n-- apply\r\n-- apply the totals, per account\r\n\
                    -- note: set-based\r\nSELECT 1;\r\n";
        let parsed = SqlProjection::parse("f.sql", text).expect("parses");
        assert_eq!(parsed.name(), "p");
    }
}
