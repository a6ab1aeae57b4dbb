//! Flags where the parser takes them: `projector status --database-url URL` and
//! `projector --projection P reset` both work, connection flags moving before the subcommand
//! and `--projection` after it; a flag only a run uses, given with a subcommand, is refused.

/// How parsing the command line ended, when it did not give a command to run.
pub(crate) enum Parsed {
    /// `--help`: print this and exit 0.
    Help(String),
    /// Bad usage: print this and exit 2.
    Usage(String),
}

/// `--watch` with its seconds: 2 when none follow (`status --watch`, `--watch --json`).
pub(super) fn with_watch_seconds(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 1);
    for (index, arg) in args.iter().enumerate() {
        out.push(arg.clone());
        if arg == "--watch" && args.get(index + 1).is_none_or(|next| next.starts_with('-')) {
            out.push("2".to_owned());
        }
    }
    out
}

/// The subcommands, as typed.
const SUBCOMMANDS: [&str; 13] = [
    "migrate",
    "seed",
    "append",
    "status",
    "reset",
    "repartition",
    "rewind",
    "wait",
    "pause",
    "resume",
    "dead-letters",
    "promote",
    "retire",
];

/// Flags of the whole command that may come before or after a subcommand.
const CONNECTION_FLAGS: [&str; 5] = [
    "--database-url",
    "--schema",
    "--keepalive-timeout-secs",
    "--session-timeout-secs",
    "--log-format",
];

/// Flags only running a projection (no subcommand) uses.
const RUN_FLAGS: [&str; 13] = [
    "--on-poison",
    "--park-storm-limit",
    "--partition-key",
    "--total-partitions",
    "--batch-size",
    "--poll-interval-ms",
    "--give-up-after",
    "--exit-when-caught-up",
    "--metrics-addr",
    "--ready-max-lag",
    "--read-replica-url",
    "--replay-side-effects",
    "--promote-within",
];

/// Subcommands that take `--projection` themselves.
const WITH_PROJECTION: [&str; 10] = [
    "status",
    "reset",
    "repartition",
    "rewind",
    "wait",
    "pause",
    "resume",
    "dead-letters",
    "promote",
    "retire",
];

/// Subcommands that take `--projection-file` themselves.
const WITH_PROJECTION_FILE: [&str; 3] = ["reset", "repartition", "dead-letters"];

/// Whether `flag`, given before any subcommand, takes a value.
fn takes_value(flag: &str) -> bool {
    !matches!(
        flag,
        "--exit-when-caught-up" | "--replay-side-effects" | "--repartition" | "--help" | "-h"
    )
}

/// Whether `flag`, given after `subcommand`, takes a value.
fn subcommand_flag_takes_value(subcommand: &str, flag: &str) -> bool {
    matches!(
        (subcommand, flag),
        ("seed", "--users" | "--renames" | "--email-changes")
            | (
                "append",
                "--bounded-context"
                    | "--aggregate-type"
                    | "--aggregate-id"
                    | "--event-type"
                    | "--payload"
                    | "--expected-version"
                    | "--file"
            )
            | (
                "status" | "reset" | "repartition" | "rewind" | "wait" | "pause" | "resume",
                "--projection"
            )
            | ("rewind", "--to-position" | "--to-time")
            | ("reset" | "repartition", "--projection-file")
            | ("repartition", "--to")
            | ("status", "--watch")
            | ("promote", "--projection" | "--version" | "--timeout")
            | ("retire", "--projection" | "--version")
            | (
                "wait",
                "--position" | "--aggregate" | "--timeout" | "--version"
            )
            | (
                "dead-letters",
                "--projection" | "--projection-file" | "--aggregate"
            )
    )
}

/// The arguments with every flag where argh expects it: connection flags given after the
/// subcommand move before it (winning over the same flag given before), and a `--projection`
/// (or `--projection-file`) given before a subcommand that takes it moves after it (unless it
/// also has its own). A flag only a run uses, given with a subcommand, is refused: it would be ignored.
pub(super) fn with_flags_in_place(args: Vec<&str>) -> Result<Vec<&str>, Parsed> {
    let Some(at) = subcommand_position(&args) else {
        return Ok(args);
    };
    let subcommand = args[at];
    let (mut before, mut moved, mut after) = (Vec::new(), Vec::new(), Vec::new());
    let mut rest = args[at + 1..].iter().copied();
    while let Some(arg) = rest.next() {
        if CONNECTION_FLAGS.contains(&arg) {
            let Some(value) = rest.next() else {
                return Err(Parsed::Usage(format!("error: {arg} needs a value")));
            };
            moved.extend([arg, value]);
        } else if RUN_FLAGS.contains(&arg)
            || (arg == "--projection" && !WITH_PROJECTION.contains(&subcommand))
            || (arg == "--projection-file" && !WITH_PROJECTION_FILE.contains(&subcommand))
        {
            return Err(run_flag_with(arg, subcommand));
        } else {
            after.push(arg);
            if subcommand_flag_takes_value(subcommand, arg) {
                after.extend(rest.next());
            }
        }
    }
    // Projection flags given before the subcommand are its own unless it has some after it.
    let own_projections = after.contains(&"--projection") || after.contains(&"--projection-file");
    let mut head = args[..at].iter().copied();
    while let Some(arg) = head.next() {
        let value = if arg.starts_with('-') && takes_value(arg) {
            head.next()
        } else {
            None
        };
        if RUN_FLAGS.contains(&arg) {
            return Err(run_flag_with(arg, subcommand));
        }
        if arg == "--projection-file" {
            // Of the subcommands, `reset` and `repartition` take a projection file as their own
            // flag (`dead-letters retry` only after its own subcommand).
            if !["reset", "repartition"].contains(&subcommand) {
                return Err(run_flag_with(arg, subcommand));
            }
            if !own_projections {
                after.push(arg);
                after.extend(value);
            }
        } else if arg == "--projection" {
            if !WITH_PROJECTION.contains(&subcommand) {
                return Err(run_flag_with(arg, subcommand));
            }
            if !own_projections {
                after.push(arg);
                after.extend(value);
            }
        } else if !moved.contains(&arg) {
            before.push(arg);
            before.extend(value);
        }
    }
    before.extend(moved);
    before.push(subcommand);
    before.extend(after);
    Ok(before)
}

/// Where the subcommand is among `args`, if there is one.
fn subcommand_position(args: &[&str]) -> Option<usize> {
    let mut at = 0;
    while at < args.len() {
        let arg = args[at];
        if SUBCOMMANDS.contains(&arg) {
            return Some(at);
        }
        at += if arg.starts_with('-') && takes_value(arg) {
            2
        } else {
            1
        };
    }
    None
}

fn run_flag_with(flag: &str, subcommand: &str) -> Parsed {
    if flag == "--projection" || flag == "--projection-file" {
        return Parsed::Usage(format!(
            "error: `projector {subcommand}` takes no {flag}: drop it"
        ));
    }
    Parsed::Usage(format!(
        "error: {flag} is for running a projection, and `projector {subcommand}` does not use \
         it: drop it, or run the projection without a subcommand"
    ))
}
