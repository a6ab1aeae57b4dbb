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
/// `setting` names the flag or variable the text came from, for the error message.
pub fn parse_partition_keys(setting: &str, text: &str, total: u32) -> Result<Vec<u32>, Error> {
    let bad = |reason: String| Error::invalid_setting(setting, text, reason);
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

    #[test]
    fn totals_must_be_positive_whole_numbers() {
        assert_eq!(parse_total_partitions("t", "4").ok(), Some(4));
        for text in ["0", "-1", "four", ""] {
            assert!(parse_total_partitions("t", text).is_err(), "{text:?}");
        }
    }
}
