//! Partition assignment against reference vectors computed by an independent implementation.

use projector::{fnv1a32, partition_of};

/// A copy, kept in the repository, of the reference vectors (`tests/data/README.md`).
const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/fnv1a32-partition-vectors.tsv"
);

#[test]
fn partition_of_matches_every_reference_vector() {
    let table = std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("read {VECTORS}: {e}"));
    let mut lines = table.lines().filter(|line| !line.starts_with('#'));
    let header: Vec<&str> = lines.next().expect("a header line").split('\t').collect();
    assert_eq!(header[..2], ["aggregate_id", "fnv1a32"]);
    let totals: Vec<u32> = header[2..]
        .iter()
        .map(|column| column.trim_start_matches('p').parse().expect("a pN column"))
        .collect();
    let mut checked = 0;
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), header.len(), "malformed vector line {line:?}");
        let id = fields[0];
        let hash: u32 = fields[1].parse().expect("a hash");
        assert_eq!(fnv1a32(id.as_bytes()), hash, "fnv1a32 of {id:?}");
        for (total, expected) in totals.iter().zip(&fields[2..]) {
            let expected: u32 = expected.parse().expect("a partition");
            assert_eq!(
                partition_of(id, *total),
                expected,
                "partition_of({id:?}, {total})"
            );
            checked += 1;
        }
    }
    assert!(checked >= 500, "only {checked} vectors checked");
}
