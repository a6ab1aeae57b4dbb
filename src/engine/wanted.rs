//! Which events one read of the stream fetches whole: those of the partitions of the lanes on
//! the shared read (and of stragglers that asked to rejoin it, see
//! [`crate::engine::straggler`]). A process that holds few partitions — with explicit keys, or
//! sharing the partitions with other processes — then reads positions and aggregate ids of
//! every event, but payloads only of its own.

use crate::engine::router::Lane;
use crate::partition::partition_of;

/// The partitions whose events a read fetches whole, by partition count.
#[derive(Debug)]
pub(crate) struct Wanted {
    /// Per partition count of some lane: which of its partitions are wanted.
    by_total: Vec<(u32, Vec<bool>)>,
    /// Per lane: its partition is wanted (its events are in the read).
    lanes: Vec<bool>,
}

impl Wanted {
    /// The partitions of `lanes` for which `to_read` is true.
    pub(crate) fn new(lanes: &[Lane], to_read: &[bool]) -> Wanted {
        let mut by_total: Vec<(u32, Vec<bool>)> = Vec::new();
        for (lane, _) in lanes.iter().zip(to_read).filter(|(_, read)| **read) {
            let at = match by_total.iter().position(|(total, _)| *total == lane.total) {
                Some(at) => at,
                None => {
                    by_total.push((lane.total, vec![false; lane.total as usize]));
                    by_total.len() - 1
                }
            };
            if let Some(wanted) = by_total[at].1.get_mut(lane.partition as usize) {
                *wanted = true;
            }
        }
        let lanes = lanes
            .iter()
            .map(|lane| {
                by_total.iter().any(|(total, partitions)| {
                    *total == lane.total
                        && partitions
                            .get(lane.partition as usize)
                            .copied()
                            .unwrap_or(false)
                })
            })
            .collect();
        Wanted { by_total, lanes }
    }

    /// True when, for every partition count, at most half of the partitions are wanted:
    /// reading keys first, then only the wanted rows, sends the server less than whole rows.
    pub(crate) fn is_at_most_half(&self) -> bool {
        self.by_total.iter().all(|(total, partitions)| {
            partitions.iter().filter(|wanted| **wanted).count() * 2 <= *total as usize
        })
    }

    /// True when some wanted partition takes the events of `aggregate_id`.
    pub(crate) fn takes(&self, aggregate_id: &str) -> bool {
        self.by_total.iter().any(|(total, partitions)| {
            partitions
                .get(partition_of(aggregate_id, *total) as usize)
                .copied()
                .unwrap_or(false)
        })
    }

    /// Per lane: whether the read has its events.
    pub(crate) fn covered_lanes(self) -> Vec<bool> {
        self.lanes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Scope;

    fn lane(partition: u32, total: u32) -> Lane {
        let (queue, _) = crossbeam_channel::bounded(1);
        Lane {
            projection: format!("p{total}"),
            partition,
            total,
            scope: Scope::default(),
            queue,
            min_batch: 1,
        }
    }

    #[test]
    fn a_read_for_one_of_four_partitions_takes_only_its_aggregates_and_covers_only_its_lane() {
        let lanes: Vec<Lane> = (0..4).map(|p| lane(p, 4)).collect();
        let wanted = Wanted::new(&lanes, &[false, true, false, false]);
        assert!(wanted.is_at_most_half());
        for n in 0..100 {
            let id = format!("aggregate-{n}");
            assert_eq!(wanted.takes(&id), partition_of(&id, 4) == 1, "{id}");
        }
        assert_eq!(wanted.covered_lanes(), vec![false, true, false, false]);
    }

    #[test]
    fn a_lane_of_another_projection_on_a_wanted_partition_is_covered_too() {
        let mut lanes: Vec<Lane> = (0..4).map(|p| lane(p, 4)).collect();
        lanes.push(lane(2, 4));
        lanes.push(lane(0, 1));
        let wanted = Wanted::new(&lanes, &[false, false, true, false, false, false]);
        assert!(wanted.is_at_most_half());
        assert_eq!(
            wanted.covered_lanes(),
            vec![false, false, true, false, true, false]
        );
        let all = Wanted::new(&lanes, &[false, false, false, false, false, true]);
        assert!(
            !all.is_at_most_half(),
            "the one partition of 1 is all of it"
        );
    }
}
