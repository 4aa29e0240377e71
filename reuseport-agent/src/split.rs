//! A weighted split of new connections between two active generations (`activate GROUP GEN
//! --weight P`): how many entries of the active table the new generation gets, and where.
//!
//! The program picks `active[hash & (len - 1)]` (see `reuseport-common`), so a generation
//! that holds `n` of the table's `len` entries gets `n / len` of the hash space, exactly.
//! The percentage is rounded to the nearest entry, half up, and kept at one entry or more on
//! each side: with `len` = 128, 10 % is 13 entries (10.16 %), 1 % is 1 (0.78 %), 99 % is
//! 127. Only the table's length enters the rule.
//!
//! The new generation's entries are spread evenly over the table (entry `i` is its own when
//! `⌊(i + 1)·n / len⌋ > ⌊i·n / len⌋`) rather than bunched at the start, so that no run of
//! hash values favours either side.

/// A weighted share in whole percent, 1 to 99 (100 is a plain flip, 0 is standby).
pub(crate) const MIN_WEIGHT: u8 = 1;
pub(crate) const MAX_WEIGHT: u8 = 99;

/// Entries of a table of `len` that `weight` percent rounds to (see the module doc).
pub(crate) fn entries(weight: u8, len: usize) -> usize {
    let weight = usize::from(weight.clamp(MIN_WEIGHT, MAX_WEIGHT));
    ((weight * len + 50) / 100).clamp(1, len - 1)
}

/// Fills `table` with `weighted`'s slots on [`entries`]`(weight, table.len())` evenly spread
/// entries and `rest`'s slots on the others, each side's slots repeated cyclically. A side
/// without slots leaves its entries to the other. Returns the distinct slots listed.
pub(crate) fn fill<T: Copy>(table: &mut [T], weighted: &[T], rest: &[T], weight: u8) -> usize {
    if weighted.is_empty() || rest.is_empty() {
        let only = if weighted.is_empty() { rest } else { weighted };
        for (i, d) in table.iter_mut().enumerate() {
            if let Some(slot) = only.get(i % only.len().max(1)) {
                *d = *slot;
            }
        }
        return only.len();
    }
    let (len, n) = (table.len(), entries(weight, table.len()));
    let (mut w, mut r) = (0, 0);
    for (i, d) in table.iter_mut().enumerate() {
        if (i + 1) * n / len > i * n / len {
            *d = weighted[w % weighted.len()];
            w += 1;
        } else {
            *d = rest[r % rest.len()];
            r += 1;
        }
    }
    weighted.len() + rest.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_the_nearest_entry_and_keeps_both_sides() {
        assert_eq!(entries(10, 128), 13);
        assert_eq!(entries(50, 128), 64);
        assert_eq!(entries(1, 128), 1);
        assert_eq!(entries(99, 128), 127);
        assert_eq!(entries(10, 1024), 102);
        assert_eq!(entries(1, 1024), 10);
        assert_eq!(entries(1, 16), 1, "never zero entries for a weighted side");
        assert_eq!(entries(99, 16), 15, "never the whole table");
    }

    #[test]
    fn every_weight_gets_exactly_its_entries_spread_evenly() {
        for len in [128usize, 1024] {
            for weight in MIN_WEIGHT..=MAX_WEIGHT {
                let mut table = vec![0u32; len];
                let listed = fill(&mut table, &[7, 8], &[1, 2, 3], weight);
                assert_eq!(listed, 5);
                let n = entries(weight, len);
                let ours = table.iter().filter(|s| **s >= 7).count();
                assert_eq!(ours, n, "weight {weight} of {len}");
                // Evenly: any window of len/n + 1 entries holds at least one of ours.
                let gap = table
                    .split(|s| *s >= 7)
                    .map(<[u32]>::len)
                    .max()
                    .unwrap_or(0);
                assert!(gap <= len / n, "weight {weight} of {len}: a gap of {gap}");
                // Each side's slots are repeated cyclically.
                let sevens = table.iter().filter(|s| **s == 7).count();
                assert!(sevens.abs_diff(n - sevens) <= 1, "weight {weight}");
            }
        }
    }

    #[test]
    fn a_side_without_slots_leaves_the_table_to_the_other() {
        let mut table = [0u32; 8];
        assert_eq!(fill(&mut table, &[], &[4, 5], 10), 2);
        assert_eq!(table, [4, 5, 4, 5, 4, 5, 4, 5]);
        assert_eq!(fill(&mut table, &[9], &[], 10), 1);
        assert_eq!(table, [9; 8]);
    }
}
