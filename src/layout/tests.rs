use super::*;

/// A small deterministic generator, so failures can be replayed.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Workers of layout `total` run partition by partition from `checkpoints` to a stop of
/// their own (at most `end`), applying what is above their checkpoint and not covered by
/// an earlier layout, as `Worker::commit` does.
fn run_partially(
    events: &[String],
    applied: &mut [u32],
    total: u32,
    checkpoints: &mut [i64],
    earlier: &[EarlierLayout],
    random: &mut Random,
    to_the_end: bool,
) {
    let end = events.len() as i64;
    for (key, checkpoint) in checkpoints.iter_mut().enumerate() {
        let stop = if to_the_end {
            end
        } else {
            *checkpoint + random.below((end - *checkpoint) as u64 + 1) as i64
        };
        for position in *checkpoint + 1..=stop {
            let aggregate = &events[position as usize - 1];
            if partition_of(aggregate, total) as usize == key
                && !earlier.iter().any(|l| l.covers(position, aggregate))
            {
                applied[position as usize - 1] += 1;
            }
        }
        *checkpoint = stop;
    }
}

#[test]
fn chains_of_layout_changes_apply_every_event_exactly_once() {
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let events: Vec<String> = (0..400)
            .map(|_| format!("thing-{}", random.below(60)))
            .collect();
        let mut applied = vec![0u32; events.len()];
        let mut total = 1 + random.below(8) as u32;
        let mut checkpoints = vec![0i64; total as usize];
        let mut earlier: Vec<EarlierLayout> = Vec::new();
        let changes = 1 + random.below(4);
        for _ in 0..changes {
            run_partially(
                &events,
                &mut applied,
                total,
                &mut checkpoints,
                &earlier,
                &mut random,
                false,
            );
            // Retirement, as `retire_earlier` does it.
            let lowest = checkpoints.iter().copied().min().unwrap_or(0);
            earlier.retain(|l| l.applied_at_most() > lowest);
            let replaced = EarlierLayout {
                total_partitions: total,
                checkpoints: checkpoints.clone(),
            };
            let (start, inherited) = succession(replaced, std::mem::take(&mut earlier));
            earlier = inherited;
            total = 1 + random.below(8) as u32;
            checkpoints = vec![start; total as usize];
        }
        run_partially(
            &events,
            &mut applied,
            total,
            &mut checkpoints,
            &earlier,
            &mut random,
            true,
        );
        let wrong: Vec<(usize, u32)> = applied
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n != 1)
            .map(|(i, &n)| (i + 1, n))
            .collect();
        assert!(
            wrong.is_empty(),
            "round {round}: (position, times) {wrong:?}"
        );
    }
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// One layout of a chain: its partition count, where each of its partitions stops
    /// (a fraction of what is left, in 1/255ths) and whether earlier layouts every
    /// partition has passed are retired before it is replaced.
    #[derive(Debug, Clone)]
    struct Stage {
        total: u32,
        stops: Vec<u8>,
        retire: bool,
    }

    fn stage() -> impl Strategy<Value = Stage> {
        (
            1..=8u32,
            proptest::collection::vec(any::<u8>(), 8),
            any::<bool>(),
        )
            .prop_map(|(total, stops, retire)| Stage {
                total,
                stops,
                retire,
            })
    }

    /// Workers of layout `total`, all starting at `start`, each run to the stop
    /// `stop_of(key)`, applying what is theirs and not covered by an earlier layout, as
    /// `Worker::commit` does; returns their checkpoints.
    fn run(
        events: &[String],
        applied: &mut [u32],
        total: u32,
        start: i64,
        earlier: &[EarlierLayout],
        stop_of: impl Fn(usize) -> i64,
    ) -> Vec<i64> {
        (0..total as usize)
            .map(|key| {
                let stop = stop_of(key);
                for position in start + 1..=stop {
                    let aggregate = &events[position as usize - 1];
                    if partition_of(aggregate, total) as usize == key
                        && !earlier.iter().any(|l| l.covers(position, aggregate))
                    {
                        applied[position as usize - 1] += 1;
                    }
                }
                stop
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The chain rule, as `chains_of_layout_changes_apply_every_event_exactly_once`
        /// checks it, with inputs proptest shrinks to a smallest failing chain.
        #[test]
        fn every_chain_of_layouts_applies_every_event_exactly_once(
            aggregates in proptest::collection::vec(0..40u8, 1..200),
            stages in proptest::collection::vec(stage(), 1..6),
            last_total in 1..=8u32,
        ) {
            let events: Vec<String> =
                aggregates.iter().map(|a| format!("thing-{a}")).collect();
            let end = events.len() as i64;
            let mut applied = vec![0u32; events.len()];
            let mut start = 0;
            let mut earlier: Vec<EarlierLayout> = Vec::new();
            for stage in &stages {
                let checkpoints = run(&events, &mut applied, stage.total, start, &earlier, |key| {
                    start + (end - start) * i64::from(stage.stops[key]) / 255
                });
                if stage.retire {
                    // As `retire_earlier` does it.
                    let lowest = checkpoints.iter().copied().min().unwrap_or(0);
                    earlier.retain(|l| l.applied_at_most() > lowest);
                }
                let lowest = checkpoints.iter().copied().min().unwrap_or(0);
                let replaced = EarlierLayout {
                    total_partitions: stage.total,
                    checkpoints,
                };
                let (next_start, inherited) =
                    succession(replaced, std::mem::take(&mut earlier));
                prop_assert!(next_start >= lowest, "starts below what was applied");
                prop_assert!(inherited.iter().all(|l| l.applied_at_most() > next_start));
                start = next_start;
                earlier = inherited;
            }
            run(&events, &mut applied, last_total, start, &earlier, |_| end);
            let wrong: Vec<(usize, u32)> = applied
                .iter()
                .enumerate()
                .filter(|&(_, &n)| n != 1)
                .map(|(i, &n)| (i + 1, n))
                .collect();
            prop_assert!(wrong.is_empty(), "(position, times applied) {wrong:?}");
        }
    }
}

#[test]
fn succession_merges_equal_layouts_and_drops_what_is_behind_the_start() {
    let layout = |total, checkpoints: &[i64]| EarlierLayout {
        total_partitions: total,
        checkpoints: checkpoints.to_vec(),
    };
    let (start, earlier) = succession(
        layout(2, &[50, 70]),
        vec![layout(4, &[10, 30, 20, 40]), layout(2, &[60, 5])],
    );
    // The two vectors of 2 merge to [60, 70]; 4's highest entry (40) is below the start.
    assert_eq!(start, 60);
    assert_eq!(earlier, vec![layout(2, &[60, 70])]);

    let (start, earlier) = succession(layout(3, &[9, 9, 9]), Vec::new());
    assert_eq!(
        (start, earlier),
        (9, Vec::new()),
        "a caught-up layout leaves nothing"
    );
}
