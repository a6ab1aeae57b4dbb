//! `projector status`: each projection's partitions, checkpoints, lag, holders and parked
//! events, as a table or one JSON document.

use projector::{CheckpointStatus, Error};
use serde_json::{Value, json};

pub(super) fn print_status(
    client: &mut projector::postgres::Client,
    projection: Option<&str>,
    json: bool,
) -> Result<(), Error> {
    let rows = projector::status(client, projection)?;
    if json {
        let head = match rows.first() {
            Some(row) => row.head_position,
            None => client
                .query_one("SELECT COALESCE(MAX(global_position), 0) FROM events", &[])
                .map_err(|source| Error::Database {
                    action: "reading the head of the event store".into(),
                    source,
                })?
                .get(0),
        };
        println!("{}", status_json(head, &rows));
        return Ok(());
    }
    if rows.is_empty() {
        println!("{}", no_checkpoints(projection));
        return Ok(());
    }
    let width = projection_width(&rows);
    println!(
        "{:<width$} {:>9} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7}  HELD-BY",
        "PROJECTION", "PARTITION", "CHECKPOINT", "HEAD", "LAG", "LAG-TIME", "AGE", "PARKED"
    );
    for row in &rows {
        println!(
            "{} {:>9} {:>7}  {}",
            where_it_stands(row, width),
            format!("{}s", row.age.as_secs()),
            row.parked_events,
            held_by(row)
        );
    }
    for layout in layouts(&rows) {
        let (aggregates, events) = parked(layout);
        if events > 0 {
            let name = &layout[0].projection;
            println!(
                "{name}: {aggregates} aggregate(s) parked, with {events} event(s): see `projector \
                 dead-letters list --projection {}`",
                projector::shell_word(name)
            );
        }
    }
    for layout in layouts(&rows) {
        let Some(until) = layout[0].repartitioning_until() else {
            continue;
        };
        let from: Vec<String> = layout[0]
            .earlier_layouts
            .iter()
            .map(|l| l.total_partitions.to_string())
            .collect();
        let behind: Vec<String> = layout
            .iter()
            .filter(|row| row.last_position < until)
            .map(|row| format!("{}/{}", row.partition_key, row.total_partitions))
            .collect();
        println!(
            "{}: re-partitioning from {} to {} partitions in progress: {} of {} partition(s) \
             past global position {until}, the last applied under the earlier layout(s){}",
            layout[0].projection,
            from.join(" and "),
            layout[0].total_partitions,
            layout.len() - behind.len(),
            layout.len(),
            if behind.is_empty() {
                String::new()
            } else {
                format!("; still skipping: {}", behind.join(", "))
            }
        );
    }
    Ok(())
}

/// The HELD-BY column: `-`, or the server pid of the holding connection, the projector
/// process's own pid when its `application_name` gives it, and, where the server shows it, the
/// connection's client end (`pid=4711 process=1234 client=127.0.0.1:40122`).
fn held_by(row: &CheckpointStatus) -> String {
    let Some(pid) = row.held_by_pid else {
        return "-".to_owned();
    };
    let mut text = format!("pid={pid}");
    if let Some(process) = row
        .held_by_application
        .as_deref()
        .and_then(|name| name.strip_prefix("projector pid "))
    {
        text.push_str(&format!(" process={process}"));
    }
    if let Some(client) = &row.held_by_client {
        text.push_str(&format!(" client={client}"));
    }
    text
}

/// Parked aggregates and events of a layout's partitions.
fn parked(layout: &[CheckpointStatus]) -> (u64, u64) {
    layout.iter().fold((0, 0), |(a, e), row| {
        (a + row.parked_aggregates, e + row.parked_events)
    })
}

/// The rows of each projection's layout, in order.
pub(super) fn layouts(rows: &[CheckpointStatus]) -> Vec<&[CheckpointStatus]> {
    rows.chunk_by(|a, b| a.projection == b.projection && a.total_partitions == b.total_partitions)
        .collect()
}

/// `projector status --json`: one document, one entry per projection and layout.
fn status_json(head: i64, rows: &[CheckpointStatus]) -> Value {
    let projections: Vec<Value> = layouts(rows)
        .into_iter()
        .map(|layout| {
            let first = &layout[0];
            let until = first.repartitioning_until();
            let repartitioning = until.map(|until| {
                json!({
                    "from": first.earlier_layouts.iter().map(|l| json!({
                        "total_partitions": l.total_partitions,
                        "checkpoints": l.checkpoints,
                    })).collect::<Vec<_>>(),
                    "until_position": until,
                    "partitions_done": layout.iter().filter(|r| r.last_position >= until).count(),
                })
            });
            let partitions: Vec<Value> = layout
                .iter()
                .map(|row| {
                    json!({
                        "partition": row.partition_key,
                        "checkpoint": row.last_position,
                        "lag_events": row.lag_events,
                        "lag_seconds": row.lag_time.as_secs_f64(),
                        "age_seconds": row.age.as_secs_f64(),
                        "held_by_pid": row.held_by_pid,
                        "held_by_client": row.held_by_client,
                        "held_by_application": row.held_by_application,
                        "live": row.held_by_pid.is_some(),
                        "parked_aggregates": row.parked_aggregates,
                        "parked_events": row.parked_events,
                    })
                })
                .collect();
            json!({
                "projection": first.projection,
                "total_partitions": first.total_partitions,
                "partitions": partitions,
                "repartitioning": repartitioning,
                "parked": {"aggregates": parked(layout).0, "events": parked(layout).1},
            })
        })
        .collect();
    json!({ "head_position": head, "projections": projections })
}

/// What status says when there is nothing to show.
pub(super) fn no_checkpoints(projection: Option<&str>) -> String {
    format!(
        "no checkpoints yet{}",
        projection
            .map(|p| format!(" for '{p}'"))
            .unwrap_or_default()
    )
}

/// The width of the PROJECTION column: the longest name, at least 20.
pub(super) fn projection_width(rows: &[CheckpointStatus]) -> usize {
    rows.iter()
        .map(|row| row.projection.chars().count())
        .chain([20])
        .max()
        .unwrap_or(20)
}

/// The columns `status` and `status --watch` share: projection, partition, checkpoint, head,
/// lag and lag time.
pub(super) fn where_it_stands(row: &CheckpointStatus, width: usize) -> String {
    format!(
        "{:<width$} {:>9} {:>12} {:>12} {:>10} {:>9}",
        row.projection,
        format!("{}/{}", row.partition_key, row.total_partitions),
        row.last_position,
        row.head_position,
        row.lag_events,
        format!("{}s", row.lag_time.as_secs()),
    )
}
