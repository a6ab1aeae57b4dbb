//! `projector append`: events appended through the library's append (the expected version
//! checked, `aggregate_heads` moved, listeners notified): one from flags, or many from a file
//! of JSON lines, all in one transaction.

use std::collections::BTreeMap;
use std::io::Read;

use argh::FromArgs;
use log::error;
use projector::postgres::Client;
use projector::{Appender, Database, Error, ExpectedVersion, NewEvent};
use serde_json::value::RawValue;

use super::error::CliError;
use super::output::say;

/// The bounded context of an event that names none.
const DEFAULT_CONTEXT: &str = "default";

/// The fields a line of `--file` may have.
const FIELDS: [&str; 6] = [
    "bounded_context",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "expected_version",
];

/// How many bad lines the error names; the others are counted.
const BAD_LINES_NAMED: usize = 10;

/// Append an event through the library's append (the expected version checked,
/// aggregate_heads moved, running projections notified), or every event of a file of JSON
/// lines in one transaction.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "append",
    note = "Each line of --file is one JSON object with the fields aggregate_type, aggregate_id, event_type and payload (any JSON value), and optionally bounded_context and expected_version (a number, \"any\" or \"none\"); blank lines are skipped. Every line is checked before anything is appended; then all are appended in one transaction: all or nothing. Exits 2 for bad input (naming the flag or the lines), 1 on a version conflict. The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Append {
    /// the event's bounded context, default "default"
    #[argh(option)]
    pub(crate) bounded_context: Option<String>,

    /// the event's aggregate type
    #[argh(option)]
    pub(crate) aggregate_type: Option<String>,

    /// the event's aggregate id
    #[argh(option)]
    pub(crate) aggregate_id: Option<String>,

    /// the event's type
    #[argh(option)]
    pub(crate) event_type: Option<String>,

    /// the event's payload, as JSON (stored as written)
    #[argh(option)]
    pub(crate) payload: Option<String>,

    /// the version the aggregate must be at: a number, any (the default) or none (no events
    /// yet); otherwise nothing is appended and the command exits 1
    #[argh(option)]
    pub(crate) expected_version: Option<String>,

    /// a file of JSON lines, one event per line (- for standard input), appended in one
    /// transaction
    #[argh(option)]
    pub(crate) file: Option<String>,
}

/// One line of `--file`, checked.
struct Line {
    number: usize,
    expected: ExpectedVersion,
    event: NewEvent,
}

pub(super) fn append(database: &Database, args: &Append) -> Result<(), CliError> {
    let Some(file) = &args.file else {
        let (expected, event) = event_from_flags(args)?;
        let aggregate = format!(
            "{}/{}/{}",
            event.bounded_context, event.aggregate_type, event.aggregate_id
        );
        let mut client = connect(database)?;
        let positions = projector::append(&mut client, expected, &[event])?;
        say!(
            "appended 1 event to {aggregate} at global position {}",
            positions.first().copied().unwrap_or_default()
        );
        return Ok(());
    };
    refuse_event_flags_with(file, args)?;
    let lines = checked_lines(file, &read(file)?)?;
    if lines.is_empty() {
        say!("no events in {file}: nothing appended");
        return Ok(());
    }
    let positions = append_in_one_transaction(&mut connect(database)?, file, &lines)?;
    let at = match (positions.iter().min(), positions.iter().max()) {
        (Some(first), Some(last)) if first != last => {
            format!("at global positions {first} to {last}")
        }
        (Some(only), _) => format!("at global position {only}"),
        _ => String::new(),
    };
    say!(
        "appended {} event(s) from {file} in one transaction, {at}",
        positions.len()
    );
    Ok(())
}

fn connect(database: &Database) -> Result<Client, Error> {
    let mut client = database.connect()?;
    super::check_store(&mut client, database)?;
    Ok(client)
}

/// The event the flags describe, and the version its aggregate must be at.
fn event_from_flags(args: &Append) -> Result<(ExpectedVersion, NewEvent), CliError> {
    let required = |flag: &str, value: &Option<String>| match value {
        Some(text) => Ok(non_empty(flag, text)?),
        None => Err(CliError::NotSet {
            setting: flag.to_owned(),
            hint: "give --aggregate-type, --aggregate-id, --event-type and --payload, or --file \
                   FILE (JSON lines, - for standard input)"
                .into(),
        }),
    };
    let aggregate_type = required("--aggregate-type", &args.aggregate_type)?;
    let aggregate_id = required("--aggregate-id", &args.aggregate_id)?;
    let event_type = required("--event-type", &args.event_type)?;
    let payload = required("--payload", &args.payload)?;
    if let Err(error) = serde_json::from_str::<&RawValue>(&payload) {
        return Err(
            Error::invalid_setting("--payload", &payload, format!("not JSON: {error}")).into(),
        );
    }
    let context = match &args.bounded_context {
        Some(text) => non_empty("--bounded-context", text)?,
        None => DEFAULT_CONTEXT.to_owned(),
    };
    let expected = match &args.expected_version {
        Some(text) => expected_version(text).ok_or_else(|| {
            Error::invalid_setting(
                "--expected-version",
                text,
                "expected a version number (0 or more), any, or none (the aggregate has no \
                 events yet)",
            )
        })?,
        None => ExpectedVersion::Any,
    };
    let event = NewEvent::new(context, aggregate_type, aggregate_id, event_type, payload);
    Ok((expected, event))
}

fn non_empty(flag: &str, text: &str) -> Result<String, Error> {
    if text.is_empty() {
        return Err(Error::invalid_setting(
            flag,
            text,
            "expected a non-empty text",
        ));
    }
    Ok(text.to_owned())
}

/// `any`, `none` or a version number.
fn expected_version(text: &str) -> Option<ExpectedVersion> {
    match text.trim() {
        "any" => Some(ExpectedVersion::Any),
        "none" => Some(ExpectedVersion::NoStream),
        number => number
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(ExpectedVersion::Exact),
    }
}

/// `--file` describes the events itself: the event's flags beside it would be ignored.
fn refuse_event_flags_with(file: &str, args: &Append) -> Result<(), Error> {
    let given = [
        &args.bounded_context,
        &args.aggregate_type,
        &args.aggregate_id,
        &args.event_type,
        &args.payload,
        &args.expected_version,
    ];
    if given.iter().all(|flag| flag.is_none()) {
        return Ok(());
    }
    Err(Error::invalid_setting(
        "--file",
        file,
        "give either --file or an event's flags (--aggregate-type, --aggregate-id, \
         --event-type, --payload, --bounded-context, --expected-version), not both: each line \
         of the file has its own fields",
    ))
}

/// The text of `file`, or of standard input for `-`.
fn read(file: &str) -> Result<String, Error> {
    let mut text = String::new();
    let read = if file == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut text).map(|_| ()))
    };
    read.map_err(|error| {
        Error::invalid_setting("--file", file, format!("cannot read it: {error}"))
    })?;
    Ok(text)
}

/// Every non-blank line as an event, or an error naming each bad line (the first ten of
/// them).
fn checked_lines(file: &str, text: &str) -> Result<Vec<Line>, Error> {
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match event_from_line(line) {
            Ok((expected, event)) => lines.push(Line {
                number: index + 1,
                expected,
                event,
            }),
            Err(why) => bad.push(format!("line {}: {why}", index + 1)),
        }
    }
    if bad.is_empty() {
        return Ok(lines);
    }
    let count = bad.len();
    let more = count.saturating_sub(BAD_LINES_NAMED);
    bad.truncate(BAD_LINES_NAMED);
    if more > 0 {
        bad.push(format!("and {more} more"));
    }
    Err(Error::invalid_setting(
        "--file",
        file,
        format!("{count} bad line(s), nothing appended: {}", bad.join("; ")),
    ))
}

/// The event one line describes, or why it describes none.
fn event_from_line(line: &str) -> Result<(ExpectedVersion, NewEvent), String> {
    serde_json::from_str::<&RawValue>(line).map_err(|error| format!("not JSON: {error}"))?;
    let fields: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(line).map_err(|_| "not a JSON object".to_owned())?;
    if let Some(unknown) = fields.keys().find(|key| !FIELDS.contains(&key.as_str())) {
        return Err(format!(
            "unknown field {unknown} (the fields are {})",
            FIELDS.join(", ")
        ));
    }
    let text = |name: &str| -> Result<Option<String>, String> {
        let Some(raw) = fields.get(name) else {
            return Ok(None);
        };
        match serde_json::from_str::<String>(raw.get()) {
            Ok(text) if !text.is_empty() => Ok(Some(text)),
            Ok(_) => Err(format!("{name} is empty")),
            Err(_) => Err(format!("{name} is not a text")),
        }
    };
    let required = |name: &str| text(name)?.ok_or_else(|| format!("no {name}"));
    let aggregate_type = required("aggregate_type")?;
    let aggregate_id = required("aggregate_id")?;
    let event_type = required("event_type")?;
    let payload = fields.get("payload").ok_or("no payload")?.get().to_owned();
    let context = text("bounded_context")?.unwrap_or_else(|| DEFAULT_CONTEXT.to_owned());
    let expected = match fields.get("expected_version") {
        None => ExpectedVersion::Any,
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map_or_else(|_| expected_version(raw.get()), |t| expected_version(&t))
            .ok_or("expected_version must be a version number (0 or more), \"any\" or \"none\"")?,
    };
    let event = NewEvent::new(context, aggregate_type, aggregate_id, event_type, payload);
    Ok((expected, event))
}

/// Appends every line in one transaction; on a failure, names the line and appends nothing.
fn append_in_one_transaction(
    client: &mut Client,
    file: &str,
    lines: &[Line],
) -> Result<Vec<i64>, Error> {
    let appender = Appender::prepare(client)?;
    let mut tx = client.transaction().map_err(|source| Error::Database {
        action: format!("starting to append the events of {file}"),
        source,
    })?;
    let mut positions = Vec::with_capacity(lines.len());
    for line in lines {
        match appender.append(&mut tx, line.expected, std::slice::from_ref(&line.event)) {
            Ok(appended) => positions.extend(appended),
            Err(failure) => {
                error!(
                    "line {} of {file}: nothing appended (the whole file is one transaction)",
                    line.number
                );
                return Err(failure);
            }
        }
    }
    tx.commit().map_err(|source| Error::Database {
        action: format!("committing the events of {file}"),
        source,
    })?;
    Ok(positions)
}
