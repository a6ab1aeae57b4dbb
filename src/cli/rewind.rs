//! `projector rewind`: a projection's checkpoints moved back to a global position or a time
//! (the library's [`projector::rewind`]), with its read model left as it is; without `--yes`,
//! only what would move.

use std::time::SystemTime;

use argh::FromArgs;
use projector::postgres::Client;
use projector::{Error, RewindTo, shell_word};

use super::error::CliError;
use super::output::say;

/// How to say where to rewind to, for the errors of a missing or doubled target.
const ONE_OF: &str = "give exactly one of --to-position N (to apply again every event after \
                      global position N) and --to-time TIME (every event after the last one \
                      stored before TIME, an RFC 3339 time such as 2026-01-31T09:30:00Z)";

/// Move a projection's checkpoints back to a global position or a time, so that its next start
/// applies every event after it again. Its read model is NOT cleared: only for a projection
/// whose apply is idempotent or rebuilds its rows (else use reset). Refused while a live
/// process holds one of its partitions.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "rewind",
    note = "Give exactly one of --to-position and --to-time. A partition already at or below the position stays where it is. The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Rewind {
    /// the projection, by its name: any with checkpoints in this schema (a built-in one, a
    /// projection file's, a service's)
    #[argh(option)]
    pub(crate) projection: String,

    /// apply again every event after this global position (0: from the first event)
    #[argh(option)]
    pub(crate) to_position: Option<String>,

    /// apply again every event after the last one stored before this time, given in RFC 3339
    /// with its offset: 2026-01-31T09:30:00Z or 2026-01-31T10:30:00+01:00
    #[argh(option)]
    pub(crate) to_time: Option<String>,

    /// go ahead (without it, only says what would move)
    #[argh(switch)]
    pub(crate) yes: bool,
}

/// Rewinds the projection, or says what a rewind would move (exit 2) without `--yes`.
pub(super) fn rewind(mut client: Client, args: &Rewind) -> Result<(), CliError> {
    let to = target(args)?;
    // A bare name is the live version's (`tally` is `tally@2` once version 2 is live).
    let name = &projector::live_stored_name(&mut client, &args.projection)?;
    let rows = projector::status(&mut client, Some(name))?;
    if rows.is_empty() {
        return Err(Error::invalid_setting(
            "--projection",
            name,
            "no projection of that name has checkpoints in this schema, so there is nothing to \
             rewind: check the name and the schema (`projector status` lists the projections \
             with checkpoints)",
        )
        .into());
    }
    let plan = projector::plan_rewind(&mut client, name, to)?;
    if !plan.moves_anything() {
        say!(
            "projection '{name}' ({} partitions): every partition is already at or below global \
             position {}{}: nothing to rewind",
            plan.total_partitions,
            plan.position,
            target_event(&plan)
        );
        return Ok(());
    }
    if !args.yes {
        let action = format!(
            "rewind would move the checkpoints of projection '{name}' ({} partitions) back to \
             global position {}{}: {}; its read model is NOT cleared: {}{}",
            plan.total_partitions,
            plan.position,
            target_event(&plan),
            partitions(&plan),
            replay(&plan),
            parked(&plan)
        );
        return Err(CliError::not_confirmed(action, name.to_owned(), &rows));
    }
    let done = projector::rewind(&mut client, name, to)?;
    say!(
        "projection '{name}' ({} partitions) rewound to global position {}{}: {}",
        done.total_partitions,
        done.position,
        target_event(&done),
        partitions(&done)
    );
    say!("its read model was NOT cleared: {}", replay(&done));
    if done.parked_events > 0 {
        say!("{}", parked(&done).trim_start_matches("; "));
    }
    say!(
        "if a process of '{name}' is still running without a partition (a standby), it stops \
         at its next check: start it again to carry on from the rewound checkpoints"
    );
    Ok(())
}

/// The position to rewind to, from exactly one of `--to-position` and `--to-time`.
fn target(args: &Rewind) -> Result<RewindTo, CliError> {
    match (&args.to_position, &args.to_time) {
        (Some(text), None) => match text.trim().parse::<i64>() {
            Ok(position) if position >= 0 => Ok(RewindTo::Position(position)),
            _ => Err(Error::invalid_setting(
                "--to-position",
                text,
                "expected a global position, a whole number of 0 or more",
            )
            .into()),
        },
        (None, Some(text)) => Ok(RewindTo::Time(time("--to-time", text)?)),
        (Some(_), Some(time)) => Err(Error::invalid_setting(
            "--to-time",
            time,
            format!("--to-position is given too: {ONE_OF}"),
        )
        .into()),
        (None, None) => Err(CliError::NotSet {
            setting: "--to-position or --to-time".into(),
            hint: ONE_OF.into(),
        }),
    }
}

/// An RFC 3339 time with its offset (`Z` or `+01:00`): a time without one would depend on
/// where the command runs.
fn time(flag: &str, text: &str) -> Result<SystemTime, Error> {
    text.trim()
        .parse::<jiff::Timestamp>()
        .ok()
        .and_then(|time| SystemTime::try_from(time).ok())
        .ok_or_else(|| {
            Error::invalid_setting(
                flag,
                text,
                "expected an RFC 3339 time with its offset, such as 2026-01-31T09:30:00Z or \
                 2026-01-31T10:30:00+01:00",
            )
        })
}

/// A time as RFC 3339 in UTC, to the second unless it has a fraction.
fn rfc3339(time: SystemTime) -> String {
    jiff::Timestamp::try_from(time).map_or_else(|_| format!("{time:?}"), |t| t.to_string())
}

/// For a rewind to a time: which event the position is (`, the last event stored before T
/// (stored at S)`), or that there was none.
fn target_event(plan: &projector::Rewind) -> String {
    match (plan.to, plan.stored_at) {
        (RewindTo::Time(time), Some(stored)) => format!(
            ", the last event stored before {} (stored at {})",
            rfc3339(time),
            rfc3339(stored)
        ),
        (RewindTo::Time(time), None) => {
            format!(" (no event was stored before {})", rfc3339(time))
        }
        _ => String::new(),
    }
}

/// The partitions that move, those that stay and the earlier layouts that move: `partition
/// 0/4 from 50, partition 1/4 from 50; partitions 2/4, 3/4 stay where they are (at or below
/// 20)`.
fn partitions(plan: &projector::Rewind) -> String {
    let (total, position) = (plan.total_partitions, plan.position);
    let moved: Vec<String> = plan
        .moved()
        .map(|p| format!("partition {}/{total} from {}", p.partition_key, p.from))
        .collect();
    let stayed: Vec<String> = plan
        .stayed()
        .map(|p| format!("{}/{total}", p.partition_key))
        .collect();
    let mut parts = Vec::new();
    if !moved.is_empty() {
        parts.push(moved.join(", "));
    }
    match stayed[..] {
        [] => {}
        [ref one] => parts.push(format!(
            "partition {one} stays where it is (at or below {position})"
        )),
        _ => parts.push(format!(
            "partitions {} stay where they are (at or below {position})",
            stayed.join(", ")
        )),
    }
    for layout in plan.earlier_moved() {
        parts.push(format!(
            "the earlier layout of {} partitions (a re-partitioning is in progress) moves back \
             too: what it applied after {position} is applied again",
            layout.total_partitions
        ));
    }
    parts.join("; ")
}

/// What the next start does, and for which projections that is right.
fn replay(plan: &projector::Rewind) -> String {
    format!(
        "its next start applies every event after global position {} again on top of it, which \
         is right only for a projection whose apply is idempotent or rebuilds the rows it \
         touches (else rebuild it whole with `projector reset`)",
        plan.position
    )
}

/// What becomes of the parked events, when there are some: `; 1 aggregate(s) with 2 parked
/// event(s) stay parked: ...`.
fn parked(plan: &projector::Rewind) -> String {
    if plan.parked_events == 0 {
        return String::new();
    }
    format!(
        "; {} aggregate(s) with {} parked event(s) stay parked: the replay sets their events \
         after global position {} aside with them, and `projector dead-letters retry \
         --projection {} --aggregate ID` applies them all in order once the cause is fixed",
        plan.parked_aggregates,
        plan.parked_events,
        plan.position,
        shell_word(&plan.projection)
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn a_time_is_taken_in_rfc_3339_with_its_offset_only() {
        let utc = time("--to-time", "2026-01-31T09:30:00Z").expect("UTC");
        assert_eq!(utc, UNIX_EPOCH + Duration::from_secs(1_769_851_800));
        assert_eq!(
            time("--to-time", "2026-01-31T10:30:00+01:00").expect("an offset"),
            utc
        );
        assert_eq!(
            time("--to-time", "2026-01-31T09:30:00.250Z").expect("a fraction"),
            utc + Duration::from_millis(250)
        );
        for text in ["2026-01-31T09:30:00", "2026-01-31", "yesterday", ""] {
            let error = time("--to-time", text).expect_err(text).to_string();
            assert!(
                error.ends_with(
                    "expected an RFC 3339 time with its offset, such as 2026-01-31T09:30:00Z or \
                     2026-01-31T10:30:00+01:00"
                ),
                "{error}"
            );
        }
        assert_eq!(rfc3339(utc), "2026-01-31T09:30:00Z");
    }
}
