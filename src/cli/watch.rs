//! `projector status --watch [SECONDS]`: the status table again every few seconds, with each
//! partition's rate and the time it will take to catch up at that rate, until Ctrl-C (exit 0;
//! a second Ctrl-C while a query hangs exits 130 at once).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::warn;
use projector::postgres::Client;
use projector::{CheckpointStatus, Error};

use super::output::{complain, draw};
use super::status::{MoreColumns, members_lines, rows_of, table};

/// Where a partition stood at the last refresh.
type Seen = HashMap<(String, u32, u32), (i64, Instant)>;

/// Redraws the table in place on a terminal; on a pipe, prints one table after another,
/// separated by a blank line. Runs until interrupted, or until the reader goes away.
pub(crate) fn watch(
    client: &mut Client,
    projection: Option<&str>,
    every: Duration,
) -> Result<(), Error> {
    let interrupted = interrupts();
    let terminal = std::io::stdout().is_terminal();
    let mut seen = Seen::new();
    // On a terminal, start from a clear screen; later tables are drawn over the first.
    if terminal && !draw("\x1b[2J") {
        return Ok(());
    }
    loop {
        let rows = rows_of(client, projection)?;
        let states = projector::projection_states(client, projection)?;
        let now = Instant::now();
        let mut columns = |row: &CheckpointStatus| rate_and_eta(row, &mut seen, now);
        let members = projector::members(client, projection)?;
        let table = format!(
            "{}\n{}{}{}",
            time_of_day(),
            table(
                &rows,
                projection,
                Some(MoreColumns {
                    headers: ["RATE", "ETA"],
                    values: &mut columns,
                })
            ),
            super::status::state_lines(&states),
            members_lines(&members)
        );
        let drawn = if terminal {
            // Home, draw, then clear what an earlier, longer table left below.
            draw(&format!("\x1b[H{table}\x1b[J"))
        } else {
            draw(&format!("{table}\n"))
        };
        if !drawn {
            // The reader went away (a closed pipe): nothing left to do.
            return Ok(());
        }
        match interrupted.recv_timeout(every) {
            Ok(()) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {}
            // No Ctrl-C handler: the default one ends the process.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(every),
        }
    }
}

/// A channel that receives once on the first Ctrl-C (or SIGTERM); the second exits 130.
fn interrupts() -> Receiver<()> {
    let (sender, receiver) = crossbeam_channel::bounded(1);
    let mut pressed = false;
    let installed = ctrlc::set_handler(move || {
        if pressed {
            complain(format_args!("forced stop"));
            std::process::exit(130);
        }
        pressed = true;
        let _ = sender.try_send(());
    });
    if let Err(error) = installed {
        warn!("could not install the Ctrl-C handler ({error})");
    }
    receiver
}

/// The RATE (positions per second since the last refresh) and ETA columns of a partition.
fn rate_and_eta(row: &CheckpointStatus, seen: &mut Seen, now: Instant) -> [String; 2] {
    let key = (
        row.projection.clone(),
        row.total_partitions,
        row.partition_key,
    );
    let rate = seen.get(&key).and_then(|&(before, at)| {
        let seconds = now.duration_since(at).as_secs_f64();
        (seconds > 0.0).then(|| (row.last_position - before).max(0) as f64 / seconds)
    });
    seen.insert(key, (row.last_position, now));
    let eta = match rate {
        _ if row.lag_events == 0 => "-".to_owned(),
        Some(rate) if rate > 0.0 => {
            let behind = (row.head_position - row.last_position).max(0) as f64;
            projector::readable_duration(Duration::from_secs_f64(behind / rate))
        }
        Some(_) => "stalled".to_owned(),
        None => "?".to_owned(),
    };
    [
        rate.map_or_else(|| "?".to_owned(), |r| format!("{r:.0}/s")),
        eta,
    ]
}

/// The wall-clock time, UTC, as `HH:MM:SS UTC`.
fn time_of_day() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let of_day = seconds % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}
