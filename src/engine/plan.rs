//! What a runner is to run, as the builder prepares it: each projection's partitions, layout
//! and checkpoints, before any thread starts.

use crate::layout::Layout;
use crate::projections::projection::{AnyProjection, PoisonPolicy};

/// A projection as checked: which partitions of how many this process owns.
pub(crate) struct Plan {
    pub(crate) projection: AnyProjection,
    pub(crate) keys: Vec<u32>,
    pub(crate) total: u32,
    /// What the projection does with an event that keeps failing.
    pub(crate) policy: PoisonPolicy,
    /// Shares its partitions with the other live processes (`keys` are all of them).
    pub(crate) shared: bool,
    /// A new version with side effects: the stored name of the live version, whose
    /// checkpoints its fresh layout starts at.
    pub(crate) start_from: Option<String>,
}

/// A projection ready to run: its layout claimed, its read model set up, its checkpoints read.
pub(crate) struct Prepared {
    pub(crate) plan: Plan,
    pub(crate) name: String,
    pub(crate) layout: Layout,
    pub(crate) checkpoints: Vec<i64>,
    /// Per key: this process is to hold it at start (always, unless the partitions are shared).
    pub(crate) wanted: Vec<bool>,
}
