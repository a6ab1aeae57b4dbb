//! Which partition an event belongs to, and which partitions a process owns.

use crate::Error;

const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a, 32-bit, over `bytes`.
///
/// Written here rather than taken from the `fnv` crate, whose hasher is the 64-bit variant:
/// the partition assignment must match other implementations of the 32-bit one bit for bit.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u32::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The partition of an aggregate: FNV-1a 32-bit of its id's UTF-8 bytes, modulo `total`.
///
/// All events of one aggregate land in one partition, so one worker applies them in order.
///
/// ```
/// assert_eq!(projector::partition_of("user-1", 4), 0);
/// assert_eq!(projector::partition_of("user-2", 4), 1);
/// ```
///
/// # Panics
/// When `total` is 0; the runtime checks its settings before it gets here.
pub fn partition_of(aggregate_id: &str, total: u32) -> u32 {
    assert!(total > 0, "partition_of needs at least one partition");
    fnv1a32(aggregate_id.as_bytes()) % total
}

/// Parses a set of partition keys: one key (`2`), a list (`0,2`), a range (`0-3`), or a mix
/// (`0-1,3`). Every key must be below `total`; the result is sorted and has no repeats.
///
/// `setting` names the flag or variable the text came from, for the error message. A `total`
/// outside 1 to [`MAX_PARTITIONS`] refuses every text (so a range never asks for more than
/// that many keys).
pub fn parse_partition_keys(setting: &str, text: &str, total: u32) -> Result<Vec<u32>, Error> {
    let bad = |reason: String| Error::invalid_setting(setting, text, reason);
    if total == 0 || total > MAX_PARTITIONS {
        return Err(bad(format!(
            "the number of partitions ({total}) must be from 1 to {MAX_PARTITIONS}"
        )));
    }
    let mut keys = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(bad(
                "expected a key, a list such as 0,2 or a range such as 0-3".into(),
            ));
        }
        let (low, high) = match part.split_once('-') {
            Some((low, high)) if !low.trim().is_empty() => (low.trim(), high.trim()),
            _ => (part, part),
        };
        let parse = |key: &str| {
            key.parse::<u32>().map_err(|_| {
                bad(format!(
                    "'{key}' is not a partition key: keys are whole numbers from 0 to {}",
                    total.saturating_sub(1)
                ))
            })
        };
        let (low, high) = (parse(low)?, parse(high)?);
        if low > high {
            return Err(bad(format!("the range {low}-{high} is empty")));
        }
        if high >= total {
            return Err(bad(format!(
                "partition key {high} is not below the number of partitions ({total}): keys go \
                 from 0 to {}",
                total.saturating_sub(1)
            )));
        }
        keys.extend(low..=high);
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}

/// Parses a partition count: a whole number of at least 1.
pub fn parse_total_partitions(setting: &str, text: &str) -> Result<u32, Error> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err(Error::invalid_setting(
            setting,
            text,
            "there must be at least 1 partition",
        )),
        Ok(total) if total > MAX_PARTITIONS => Err(Error::invalid_setting(
            setting,
            text,
            format!("at most {MAX_PARTITIONS} partitions are supported"),
        )),
        Ok(total) => Ok(total),
        Err(_) => Err(Error::invalid_setting(
            setting,
            text,
            "expected a whole number of partitions, at least 1",
        )),
    }
}

/// Partition keys as a person writes them: `0-3`, `0,2`, `5`.
pub(crate) fn describe_keys(keys: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut index = 0;
    while index < keys.len() {
        let start = keys[index];
        let mut end = start;
        while index + 1 < keys.len() && keys[index + 1] == end + 1 {
            index += 1;
            end = keys[index];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        index += 1;
    }
    parts.join(",")
}

/// The largest partition count accepted.
pub const MAX_PARTITIONS: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_of_empty_input_is_the_offset_basis() {
        assert_eq!(fnv1a32(b""), 2_166_136_261);
    }

    #[test]
    fn keys_accept_single_list_range_and_mix() {
        assert_eq!(parse_partition_keys("k", "2", 4).ok(), Some(vec![2]));
        assert_eq!(parse_partition_keys("k", "0,2", 4).ok(), Some(vec![0, 2]));
        assert_eq!(
            parse_partition_keys("k", "0-3", 4).ok(),
            Some(vec![0, 1, 2, 3])
        );
        assert_eq!(
            parse_partition_keys("k", "3, 0-1,1", 4).ok(),
            Some(vec![0, 1, 3])
        );
    }

    #[test]
    fn keys_reject_out_of_range_negative_empty_and_words() {
        for text in ["4", "-1", "", "0,", "x", "2-1", "0-4", "1.5"] {
            let error = parse_partition_keys("--partition-key", text, 4).err();
            let message = error.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                message.starts_with(&format!("invalid value '{text}' for --partition-key")),
                "{text:?} gave {message:?}"
            );
        }
    }

    #[test]
    fn keys_are_described_as_ranges_and_lists() {
        assert_eq!(describe_keys(&[0, 1, 2, 3]), "0-3");
        assert_eq!(describe_keys(&[0, 2, 3, 5]), "0,2-3,5");
        assert_eq!(describe_keys(&[7]), "7");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        const FLAG: &str = "--partition-key";

        /// Text a person or a script might give: digits, separators, signs, spaces, words,
        /// and anything at all.
        fn key_text() -> impl Strategy<Value = String> {
            prop_oneof![
                "[0-9, +-]{0,12}",
                "[0-9]{1,12}(-[0-9]{1,12})?(,[0-9]{1,12}(-[0-9]{1,12})?){0,3}",
                "\\PC{0,16}",
                any::<String>(),
            ]
        }

        fn total() -> impl Strategy<Value = u32> {
            prop_oneof![
                1..=16u32,
                1..=MAX_PARTITIONS,
                Just(0),
                Just(MAX_PARTITIONS + 1),
                Just(u32::MAX)
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_text_gives_sorted_keys_below_the_total_or_names_flag_and_value(
                text in key_text(),
                total in total(),
            ) {
                match parse_partition_keys(FLAG, &text, total) {
                    Ok(keys) => {
                        prop_assert!(!keys.is_empty());
                        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
                        prop_assert!(keys.iter().all(|&k| k < total && k < MAX_PARTITIONS));
                    }
                    Err(Error::InvalidSetting { setting, value, reason }) => {
                        prop_assert_eq!(setting, FLAG);
                        prop_assert_eq!(value, text);
                        prop_assert!(!reason.is_empty());
                    }
                    Err(other) => prop_assert!(false, "{other:?}"),
                }
            }

            #[test]
            fn keys_written_as_ranges_or_lists_read_back_the_same(
                total in 1..=64u32,
                picks in proptest::collection::btree_set(0..64u32, 1..20),
            ) {
                let keys: Vec<u32> = picks.into_iter().filter(|&k| k < total).collect();
                prop_assume!(!keys.is_empty());
                let as_list: Vec<String> = keys.iter().map(u32::to_string).collect();
                for text in [describe_keys(&keys), as_list.join(","), as_list.join(" , ")] {
                    prop_assert_eq!(parse_partition_keys(FLAG, &text, total).ok(), Some(keys.clone()), "{}", text);
                }
                let (low, high) = (keys[0], keys[keys.len() - 1]);
                prop_assert_eq!(
                    parse_partition_keys(FLAG, &format!("{low}-{high}"), total).ok(),
                    Some((low..=high).collect::<Vec<u32>>())
                );
            }

            #[test]
            fn any_text_gives_a_total_from_1_to_the_maximum_or_names_setting_and_value(
                text in prop_oneof!["[0-9 +-]{0,12}", any::<String>()],
            ) {
                match parse_total_partitions("--total-partitions", &text) {
                    Ok(total) => {
                        prop_assert!((1..=MAX_PARTITIONS).contains(&total));
                        prop_assert_eq!(text.trim().parse::<u32>().ok(), Some(total));
                    }
                    Err(Error::InvalidSetting { setting, value, .. }) => {
                        prop_assert_eq!(setting, "--total-partitions");
                        prop_assert_eq!(value, text);
                    }
                    Err(other) => prop_assert!(false, "{other:?}"),
                }
            }

            #[test]
            fn totals_read_back_the_same(total in 1..=MAX_PARTITIONS) {
                prop_assert_eq!(parse_total_partitions("t", &total.to_string()).ok(), Some(total));
            }

            #[test]
            fn an_aggregate_has_one_partition_below_the_total(
                id in any::<String>(),
                total in prop_oneof![1..=8u32, any::<u32>().prop_map(|n| n.max(1))],
            ) {
                let partition = partition_of(&id, total);
                prop_assert!(partition < total);
                prop_assert_eq!(partition, partition_of(&id.clone(), total));
                prop_assert_eq!(partition_of(&id, 1), 0);
                prop_assert_eq!(partition, fnv1a32(id.as_bytes()) % total);
            }
        }
    }

    #[test]
    fn totals_must_be_positive_whole_numbers() {
        assert_eq!(parse_total_partitions("t", "4").ok(), Some(4));
        for text in ["0", "-1", "four", ""] {
            assert!(parse_total_partitions("t", text).is_err(), "{text:?}");
        }
    }
}
