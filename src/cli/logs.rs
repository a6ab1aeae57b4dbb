//! Log lines: text (the default) or one JSON object per line (`--log-format json`).

use std::io::Write;

use projector::Error;
use serde_json::{Map, Value, json};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// The format named by `--log-format` (or `PROJECTOR_LOG_FORMAT`), text when neither is set.
    pub(crate) fn chosen(flag: Option<String>) -> Result<LogFormat, Error> {
        match super::args::flag_or_env("--log-format", flag, "PROJECTOR_LOG_FORMAT") {
            None => Ok(LogFormat::Text),
            Some((flag, value)) => match value.trim() {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(Error::invalid_setting(
                    &flag,
                    &value,
                    "the log format is text (the default) or json",
                )),
            },
        }
    }
}

/// The projector's own lines at info, or at the level RUST_LOG gives alone (`RUST_LOG=debug`);
/// other crates (the database driver logs every statement at debug) at warn, unless RUST_LOG
/// names them (`RUST_LOG=tokio_postgres=debug`).
pub(crate) fn init(format: LogFormat) {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(log::LevelFilter::Warn)
        .filter_module("projector", log::LevelFilter::Info)
        .format_target(false);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        match spec.trim().parse::<log::LevelFilter>() {
            Ok(level) => {
                builder.filter_module("projector", level);
            }
            Err(_) => {
                builder.parse_filters(&spec);
            }
        }
    }
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = json_line(
                &buf.timestamp_millis().to_string(),
                record.level().as_str(),
                record.target(),
                &record.args().to_string(),
            );
            writeln!(buf, "{line}")
        });
    }
    builder.init();
}

/// One log line as a JSON object: time, level, target, thread and message, and the
/// projection, partition, total_partitions and position the message names, when it does.
pub(crate) fn json_line(time: &str, level: &str, target: &str, message: &str) -> String {
    let mut line = Map::new();
    line.insert("time".into(), json!(time));
    line.insert("level".into(), json!(level));
    line.insert("target".into(), json!(target));
    if let Some(thread) = std::thread::current().name() {
        line.insert("thread".into(), json!(thread));
    }
    line.insert("message".into(), json!(message));
    if let Some(projection) = quoted_after(message, "projection '")
        .or_else(|| quoted_after(message, " of '"))
        .or_else(|| quoted_after(message, "progress of '"))
    {
        line.insert("projection".into(), json!(projection));
    }
    if let Some((partition, total)) = number_after(message, "partition ")
        .zip(number_after(message, "partition ").and_then(|_| total_after(message)))
    {
        line.insert("partition".into(), json!(partition));
        line.insert("total_partitions".into(), json!(total));
    }
    if let Some(position) = number_after(message, "global position ") {
        line.insert("position".into(), json!(position));
    }
    Value::Object(line).to_string()
}

/// The text between `marker` and the next `'`.
fn quoted_after<'a>(message: &'a str, marker: &str) -> Option<&'a str> {
    let start = message.find(marker)? + marker.len();
    let end = message[start..].find('\'')?;
    Some(&message[start..start + end])
}

/// The whole number right after `marker`.
fn number_after(message: &str, marker: &str) -> Option<i64> {
    let start = message.find(marker)? + marker.len();
    let digits: String = message[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// `M` of the first `partition N/M`.
fn total_after(message: &str) -> Option<i64> {
    let start = message.find("partition ")? + "partition ".len();
    let rest = &message[start..];
    let slash = rest.find('/')?;
    if !rest[..slash].chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    number_after(&rest[slash..], "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_line_names_the_projection_partition_and_position_it_mentions() {
        let line = json_line(
            "2026-11-27T10:00:00.000Z",
            "INFO",
            "projector::worker",
            "partition 2/4 of 'users' caught up at global position 81234: back on the shared read",
        );
        let value: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(value["projection"], "users");
        assert_eq!(value["partition"], 2);
        assert_eq!(value["total_partitions"], 4);
        assert_eq!(value["position"], 81234);
        assert_eq!(value["level"], "INFO");

        let plain = json_line(
            "t",
            "WARN",
            "projector",
            "lost the database \"quoted\"\nnext",
        );
        let value: Value = serde_json::from_str(&plain).expect("valid JSON");
        assert_eq!(value["message"], "lost the database \"quoted\"\nnext");
        assert!(value.get("partition").is_none());
    }
}
