//! What a waiter decides from what it sees: which partition must pass the event waited for
//! (the owner of its aggregate, under any layout), and what a commit's notification says of it.

use std::time::Instant;

use crate::partition::partition_of;
use crate::wait::Applied;

/// What a commit's notification (`md5(projection) total key checkpoint`, see
/// `PartitionStatements::save`) tells a waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum News {
    /// Nothing that can have applied the event: another projection's commit, another
    /// partition's, or one short of the position.
    Nothing,
    /// Something may have moved: look at the checkpoints again.
    LookAgain,
    /// The partition that owns the event's aggregate under `total` partitions has passed the
    /// position: the event is applied (by that commit or before it).
    Applied {
        total: u32,
        partition: u32,
        checkpoint: i64,
    },
}

/// The event waited for.
pub(super) struct Target {
    pub(super) position: i64,
    /// The aggregate of the event at `position`, if one is stored there.
    pub(super) aggregate_id: Option<String>,
    /// The aggregate whose partition applies it: the event's, or the aggregate waited for
    /// when it has no events.
    pub(super) owner_id: Option<String>,
    pub(super) projection_md5: String,
    /// The schema's applied channel (see `notify_channel!`).
    pub(super) channel: String,
}

/// The checkpoints of one layout, as `(partition key, last position)`.
pub(super) struct Layout {
    pub(super) total: u32,
    pub(super) checkpoints: Vec<(u32, i64)>,
}

/// Where the partition that matters stands.
#[derive(Clone, Copy)]
pub(super) struct Standing {
    /// The partition owning the event's aggregate, if known.
    pub(super) owner: Option<u32>,
    /// That partition, or else the one furthest behind.
    pub(super) partition: u32,
    pub(super) checkpoint: i64,
}

impl Target {
    /// What a commit's notification says of this event.
    pub(super) fn news(&self, payload: &str) -> News {
        let mut words = payload.split(' ');
        if words.next() != Some(self.projection_md5.as_str()) {
            return News::Nothing;
        }
        let mut number = || words.next().and_then(|word| word.parse::<i64>().ok());
        let (Some(total), Some(key), Some(checkpoint)) = (number(), number(), number()) else {
            // A payload of another form: look.
            return News::LookAgain;
        };
        let (Ok(total @ 1..), Ok(partition)) = (u32::try_from(total), u32::try_from(key)) else {
            return News::LookAgain;
        };
        if checkpoint < self.position {
            return News::Nothing;
        }
        match &self.owner_id {
            // Under any layout, the owner's checkpoint past the position means applied.
            Some(id) if partition_of(id, total) == partition => News::Applied {
                total,
                partition,
                checkpoint,
            },
            Some(_) => News::Nothing,
            // With no event there, every partition must pass it.
            None => News::LookAgain,
        }
    }

    pub(super) fn applied(
        &self,
        projection: &str,
        total: u32,
        partition: Option<u32>,
        checkpoint: i64,
        started: Instant,
    ) -> Applied {
        Applied {
            projection: projection.to_owned(),
            position: self.position,
            aggregate_id: self.aggregate_id.clone(),
            partition,
            total_partitions: total,
            checkpoint,
            waited: started.elapsed(),
        }
    }
}

impl Layout {
    pub(super) fn checkpoint_of(&self, partition: u32) -> i64 {
        self.checkpoints
            .iter()
            .find(|(key, _)| *key == partition)
            .map_or(0, |(_, position)| *position)
    }

    /// The partition that must pass the target, and its checkpoint: the owner of its
    /// aggregate, or with no event at its position, the partition furthest behind.
    pub(super) fn standing(&self, target: &Target) -> Standing {
        match &target.owner_id {
            Some(id) => {
                let partition = partition_of(id, self.total);
                Standing {
                    owner: Some(partition),
                    partition,
                    checkpoint: self.checkpoint_of(partition),
                }
            }
            None => {
                let (partition, checkpoint) = (0..self.total)
                    .map(|partition| (partition, self.checkpoint_of(partition)))
                    .min_by_key(|&(_, checkpoint)| checkpoint)
                    .unwrap_or((0, 0));
                Standing {
                    owner: None,
                    partition,
                    checkpoint,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(owner_id: Option<&str>, position: i64) -> Target {
        Target {
            position,
            aggregate_id: owner_id.map(str::to_owned),
            owner_id: owner_id.map(str::to_owned),
            projection_md5: String::new(),
            channel: String::new(),
        }
    }

    #[test]
    fn the_owner_of_the_aggregate_is_the_partition_that_matters() {
        let layout = Layout {
            total: 4,
            checkpoints: vec![(0, 10), (1, 20), (2, 30), (3, 40)],
        };
        let owner = partition_of("user-2", 4);
        let standing = layout.standing(&target(Some("user-2"), 25));
        assert_eq!(standing.owner, Some(owner));
        assert_eq!(standing.partition, owner);
        assert_eq!(standing.checkpoint, layout.checkpoint_of(owner));
    }

    #[test]
    fn with_no_event_the_partition_furthest_behind_matters() {
        let layout = Layout {
            total: 3,
            checkpoints: vec![(0, 50), (1, 12), (2, 40)],
        };
        let standing = layout.standing(&target(None, 30));
        assert_eq!((standing.owner, standing.partition), (None, 1));
        assert_eq!(standing.checkpoint, 12);
    }

    #[test]
    fn a_commit_of_the_owner_past_the_position_is_news_of_the_event_applied() {
        let mut target = target(Some("user-2"), 100);
        target.projection_md5 = "abc".into();
        let (in_4, in_3) = (partition_of("user-2", 4), partition_of("user-2", 3));
        let other = (in_4 + 1) % 4;
        for (payload, news) in [
            (
                format!("abc 4 {in_4} 100"),
                News::Applied {
                    total: 4,
                    partition: in_4,
                    checkpoint: 100,
                },
            ),
            (
                format!("abc 3 {in_3} 250"),
                News::Applied {
                    total: 3,
                    partition: in_3,
                    checkpoint: 250,
                },
            ),
            (format!("abc 4 {in_4} 99"), News::Nothing),
            (format!("abc 4 {other} 250"), News::Nothing),
            (format!("xyz 4 {in_4} 250"), News::Nothing),
            ("abc".to_owned(), News::LookAgain),
            ("abc 4 one 250".to_owned(), News::LookAgain),
            ("abc 0 0 250".to_owned(), News::LookAgain),
        ] {
            assert_eq!(target.news(&payload), news, "{payload}");
        }
        // With no event at the position, any partition past it may be the last one.
        let mut nowhere = self::target(None, 100);
        nowhere.projection_md5 = "abc".into();
        assert_eq!(nowhere.news("abc 4 2 250"), News::LookAgain);
        assert_eq!(nowhere.news("abc 4 2 99"), News::Nothing);
    }

    #[test]
    fn a_missing_row_counts_as_nothing_applied() {
        let layout = Layout {
            total: 2,
            checkpoints: vec![(0, 50)],
        };
        let standing = layout.standing(&target(None, 30));
        assert_eq!((standing.partition, standing.checkpoint), (1, 0));
    }
}
