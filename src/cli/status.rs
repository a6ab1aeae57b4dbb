//! `projector status`: each projection's partitions, checkpoints, lag, holders and parked
//! events, as a table or one JSON document.

use projector::{CheckpointStatus, Error, ProjectionState, StateKind};
use serde_json::{Value, json};

use super::output::say;

pub(super) fn print_status(
    client: &mut projector::postgres::Client,
    projection: Option<&str>,
    json: bool,
) -> Result<(), Error> {
    let rows = rows_of(client, projection)?;
    let states = projector::projection_states(client, projection)?;
    let members = projector::members(client, projection)?;
    let versions = versions_of(client, projection)?;
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
        let mut document = status_json(head, &rows, &states, &members);
        if !versions.is_empty() {
            // Only with versions, so that the document stays as it was without them.
            document["versions"] = versions.iter().map(version_json).collect();
        }
        say!("{document}");
        return Ok(());
    }
    let mut text = table(&rows, projection, None);
    text.push_str(&version_lines(&versions));
    text.push_str(&state_lines(&states));
    text.push_str(&members_lines(&members));
    say!("{}", text.trim_end());
    Ok(())
}

/// A line per stored state: `users: FAILED 12s ago on partition 1/4 before global position
/// 4711 (pid 1234 on host), until a process of it starts again: the error`, `users: PAUSED 3s
/// ago (...): ...`.
pub(super) fn state_lines(states: &[ProjectionState]) -> String {
    let mut text = String::new();
    for state in states {
        let name = &state.projection;
        let ago = super::dead_letters::ago(state.changed_at);
        let process = state
            .process
            .as_deref()
            .map(|process| format!(" ({process})"))
            .unwrap_or_default();
        let line = match state.state {
            StateKind::Paused => format!(
                "{name}: PAUSED {ago}{process}: its partitions are held and nothing is applied \
                 until `projector resume --projection {}`",
                projector::shell_word(name)
            ),
            _ => {
                let partition = match (state.partition, state.total_partitions) {
                    (Some(key), Some(total)) => format!(" on partition {key}/{total}"),
                    _ => String::new(),
                };
                let position = state
                    .position
                    .map(|p| format!(" before global position {p}"))
                    .unwrap_or_default();
                // On one line (the JSON keeps the error as it was).
                let error = state.error.as_deref().unwrap_or("no error stored");
                let error: Vec<&str> = error.split_whitespace().collect();
                format!(
                    "{name}: FAILED {ago}{partition}{position}{process}, until a process of it \
                     starts again: {}",
                    error.join(" ")
                )
            }
        };
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// The versions of every projection, or of `projection` (by its name or a version's stored
/// name `name@N`).
pub(super) fn versions_of(
    client: &mut projector::postgres::Client,
    projection: Option<&str>,
) -> Result<Vec<projector::ProjectionVersion>, Error> {
    let mut versions = projector::versions(client)?;
    if let Some(name) = projection {
        let (name, _) = projector::split_stored_name(name);
        versions.retain(|version| version.projection == name);
    }
    Ok(versions)
}

/// A line per projection with several versions: `tally: version 1 live; version 2 building,
/// 1234 position(s) behind the head, ETA 42s (at its average rate since its first start)`.
pub(super) fn version_lines(versions: &[projector::ProjectionVersion]) -> String {
    let mut text = String::new();
    for group in versions.chunk_by(|a, b| a.projection == b.projection) {
        let each: Vec<String> = group
            .iter()
            .map(|version| {
                let mut one = format!("version {} {}", version.version, version.state.name());
                if let Some(behind) = version.behind {
                    one.push_str(&format!(", {behind} position(s) behind the head"));
                }
                if let Some(eta) = version.eta {
                    one.push_str(&format!(
                        ", ETA {} (at its average rate since its first start)",
                        projector::readable_duration(eta)
                    ));
                }
                one
            })
            .collect();
        text.push_str(&format!("{}: {}\n", group[0].projection, each.join("; ")));
    }
    text
}

/// A version in `status --json`.
fn version_json(version: &projector::ProjectionVersion) -> Value {
    json!({
        "projection": version.projection,
        "version": version.version,
        "stored_name": version.stored_name,
        "state": version.state.name(),
        "seconds_in_state": version.since.as_secs_f64(),
        "positions_behind": version.behind,
        "eta_seconds": version.eta.map(|eta| eta.as_secs_f64()),
    })
}

/// A stored state in `status --json`.
fn state_json(state: &ProjectionState) -> Value {
    let changed_at = state
        .changed_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    json!({
        "state": state.state.name(),
        "error": state.error,
        "partition": state.partition,
        "total_partitions": state.total_partitions,
        "position": state.position,
        "process": state.process,
        "changed_at_unix": changed_at,
    })
}

/// The checkpoints `status` shows: every projection's, or those of one that is known here
/// (see [`super::known_here`]).
pub(super) fn rows_of(
    client: &mut projector::postgres::Client,
    projection: Option<&str>,
) -> Result<Vec<CheckpointStatus>, Error> {
    let mut rows = projector::status(client, projection)?;
    if let Some(name) = projection.filter(|name| projector::split_stored_name(name).1 == 1) {
        // With the rows of its later versions.
        for version in versions_of(client, Some(name))? {
            if version.version > 1 {
                rows.extend(projector::status(client, Some(&version.stored_name))?);
            }
        }
    }
    match projection {
        Some(name) if rows.is_empty() => super::known_here(client, name).map(|()| rows),
        _ => Ok(rows),
    }
}

/// Two more columns, before HELD-BY: `status --watch` adds RATE and ETA.
pub(super) struct MoreColumns<'a> {
    /// Their headers.
    pub(super) headers: [&'static str; 2],
    /// Their values on a partition's line.
    pub(super) values: &'a mut dyn FnMut(&CheckpointStatus) -> [String; 2],
}

/// The status table, one line per partition, then a line per projection with parked events and
/// per re-partitioning in progress; `status --watch` adds two columns before HELD-BY.
pub(super) fn table(
    rows: &[CheckpointStatus],
    projection: Option<&str>,
    mut more: Option<MoreColumns<'_>>,
) -> String {
    if rows.is_empty() {
        return format!("{}\n", no_checkpoints(projection));
    }
    let width = projection_width(rows);
    let mut text = format!(
        "{:<width$} {:>9} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7}",
        "PROJECTION", "PARTITION", "CHECKPOINT", "HEAD", "LAG", "LAG-TIME", "AGE", "PARKED"
    );
    if let Some(MoreColumns {
        headers: [first, second],
        ..
    }) = &more
    {
        text.push_str(&format!(" {first:>12} {second:>9}"));
    }
    text.push_str("  HELD-BY\n");
    for row in rows {
        text.push_str(&format!(
            "{:<width$} {:>9} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7}",
            row.projection,
            format!("{}/{}", row.partition_key, row.total_partitions),
            row.last_position,
            row.head_position,
            row.lag_events,
            format!("{}s", row.lag_time.as_secs()),
            format!("{}s", row.age.as_secs()),
            row.parked_events,
        ));
        if let Some(more) = &mut more {
            let [first, second] = (more.values)(row);
            text.push_str(&format!(" {first:>12} {second:>9}"));
        }
        text.push_str(&format!("  {}\n", held_by(row)));
    }
    for layout in layouts(rows) {
        let (aggregates, events) = parked(layout);
        if events > 0 {
            let name = &layout[0].projection;
            text.push_str(&format!(
                "{name}: {aggregates} aggregate(s) parked, with {events} event(s): see `projector \
                 dead-letters list --projection {}`\n",
                projector::shell_word(name)
            ));
        }
    }
    for layout in layouts(rows) {
        if let Some(line) = repartitioning(layout) {
            text.push_str(&line);
            text.push('\n');
        }
    }
    text
}

/// The line on a re-partitioning of `layout` in progress, if one is.
fn repartitioning(layout: &[CheckpointStatus]) -> Option<String> {
    let until = layout[0].repartitioning_until()?;
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
    Some(format!(
        "{}: re-partitioning from {} to {} partitions in progress: {} of {} partition(s) past \
         global position {until}, the last applied under the earlier layout(s){}",
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
    ))
}

/// The HELD-BY column: `-`, or the server pid of the holding connection, the projector
/// process's own pid when its `application_name` gives it, and, where the server shows it, the
/// connection's client end (`pid=4711 process=1234 client=127.0.0.1:40122`).
fn held_by(row: &CheckpointStatus) -> String {
    match row.held_by_pid {
        Some(pid) => session(
            pid,
            row.held_by_application.as_deref(),
            row.held_by_client.as_deref(),
        ),
        None => "-".to_owned(),
    }
}

/// A server session as `status` names it: its server pid, the projector process's own pid when
/// its `application_name` gives it, and its client end where the server shows it
/// (`pid=4711 process=1234 client=127.0.0.1:40122`).
fn session(pid: i32, application: Option<&str>, client: Option<&str>) -> String {
    let mut text = format!("pid={pid}");
    if let Some(process) = application.and_then(|name| name.strip_prefix("projector pid ")) {
        text.push_str(&format!(" process={process}"));
    }
    if let Some(client) = client {
        text.push_str(&format!(" client={client}"));
    }
    text
}

/// A line per projection whose partitions processes share (`--partition-key auto`): how many,
/// and each one's holder-style identity, when it joined and when it was last seen.
pub(super) fn members_lines(members: &[projector::Member]) -> String {
    let mut text = String::new();
    for group in members.chunk_by(|a, b| a.projection == b.projection) {
        let each: Vec<String> = group
            .iter()
            .map(|member| {
                let mut one = session(
                    member.pid,
                    member.application.as_deref(),
                    member.client.as_deref(),
                );
                if let (Some(joined), Some(seen)) = (member.joined, member.last_seen) {
                    one.push_str(&format!(
                        " (joined {} ago, seen {} ago)",
                        projector::readable_duration(joined),
                        projector::readable_duration(seen)
                    ));
                }
                one
            })
            .collect();
        text.push_str(&format!(
            "{}: shared by {} process(es): {}\n",
            group[0].projection,
            group.len(),
            each.join("; ")
        ));
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
fn status_json(
    head: i64,
    rows: &[CheckpointStatus],
    states: &[ProjectionState],
    members: &[projector::Member],
) -> Value {
    // The failure first: a paused projection that failed is first of all failed.
    let state_of = |name: &str| {
        let mut of: Vec<&ProjectionState> =
            states.iter().filter(|s| s.projection == name).collect();
        of.sort_by_key(|s| s.state != StateKind::Failed);
        of.first().map(|s| state_json(s))
    };
    let is_paused = |name: &str| {
        states
            .iter()
            .any(|s| s.projection == name && s.state == StateKind::Paused)
    };
    let mut projections: Vec<Value> = layouts(rows)
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
            let sharing: Vec<Value> = members
                .iter()
                .filter(|member| member.projection == first.projection)
                .map(|member| {
                    json!({
                        "pid": member.pid,
                        "application": member.application,
                        "client": member.client,
                        "joined_seconds_ago": member.joined.map(|d| d.as_secs_f64()),
                        "last_seen_seconds_ago": member.last_seen.map(|d| d.as_secs_f64()),
                    })
                })
                .collect();
            json!({
                "projection": first.projection,
                "total_partitions": first.total_partitions,
                "members": sharing,
                "partitions": partitions,
                "repartitioning": repartitioning,
                "parked": {"aggregates": parked(layout).0, "events": parked(layout).1},
                "state": state_of(&first.projection),
                "paused": is_paused(&first.projection),
            })
        })
        .collect();
    // A projection with a stored state and no checkpoints (paused before it first ran).
    let mut without_checkpoints: Vec<&str> = states
        .iter()
        .map(|s| s.projection.as_str())
        .filter(|name| !rows.iter().any(|row| row.projection == *name))
        .collect();
    without_checkpoints.dedup();
    for name in without_checkpoints {
        projections.push(json!({
            "projection": name,
            "total_partitions": null,
            "partitions": [],
            "repartitioning": null,
            "parked": {"aggregates": 0, "events": 0},
            "state": state_of(name),
            "paused": is_paused(name),
        }));
    }
    json!({ "head_position": head, "projections": projections })
}

/// What status says when there is nothing to show.
fn no_checkpoints(projection: Option<&str>) -> String {
    format!(
        "no checkpoints yet{}",
        projection
            .map(|p| format!(" for '{p}'"))
            .unwrap_or_default()
    )
}

/// The width of the PROJECTION column: the longest name, at least 20.
fn projection_width(rows: &[CheckpointStatus]) -> usize {
    rows.iter()
        .map(|row| row.projection.chars().count())
        .chain([20])
        .max()
        .unwrap_or(20)
}
