//! `projector status --watch [SECONDS]`: the status table again every few seconds, with each
//! partition's rate and the time it will take to catch up at that rate.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use projector::postgres::Client;
use projector::{CheckpointStatus, Error};

use super::status::{no_checkpoints, projection_width, where_it_stands};

/// Where a partition stood at the last refresh.
type Seen = HashMap<(String, u32, u32), (i64, Instant)>;

/// Redraws the table in place on a terminal; on a pipe, prints one table after another,
/// separated by a blank line. Runs until interrupted.
pub(crate) fn watch(
    client: &mut Client,
    projection: Option<&str>,
    every: Duration,
) -> Result<(), Error> {
    let terminal = std::io::stdout().is_terminal();
    let mut seen = Seen::new();
    if terminal {
        // Start from a clear screen; later tables are drawn over the first.
        print!("\x1b[2J");
    }
    loop {
        let rows = projector::status(client, projection)?;
        let table = table(&rows, &mut seen, projection);
        let mut out = std::io::stdout().lock();
        let written = if terminal {
            // Home, draw, then clear what an earlier, longer table left below.
            write!(out, "\x1b[H{table}\x1b[J")
        } else {
            writeln!(out, "{table}")
        };
        if written.and_then(|()| out.flush()).is_err() {
            // The reader went away (a closed pipe): nothing left to do.
            return Ok(());
        }
        drop(out);
        std::thread::sleep(every);
    }
}

/// The table: lag, rate (positions per second since the last refresh) and ETA per partition.
fn table(rows: &[CheckpointStatus], seen: &mut Seen, projection: Option<&str>) -> String {
    let now = Instant::now();
    let mut text = format!("{}\n", time_of_day());
    if rows.is_empty() {
        text.push_str(&no_checkpoints(projection));
        text.push('\n');
        return text;
    }
    let width = projection_width(rows);
    text.push_str(&format!(
        "{:<width$} {:>9} {:>12} {:>12} {:>10} {:>9} {:>12} {:>9}  HELD-BY\n",
        "PROJECTION", "PARTITION", "CHECKPOINT", "HEAD", "LAG", "LAG-TIME", "RATE", "ETA"
    ));
    for row in rows {
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
        let held_by = row
            .held_by_pid
            .map_or_else(|| "-".to_owned(), |pid| format!("pid {pid}"));
        text.push_str(&format!(
            "{} {:>12} {:>9}  {}\n",
            where_it_stands(row, width),
            rate.map_or_else(|| "?".to_owned(), |r| format!("{r:.0}/s")),
            eta,
            held_by
        ));
    }
    text
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
