//! The status page's chart data: new connections per second of each generation, from the
//! counters of successive samples, over a bounded window (the last [`WINDOW`] samples).
//!
//! A generation's rate at a sample is what its `selected` and `fallback` counters grew by
//! since the previous sample, per second. A generation that appears in a group the previous
//! sample saw registered since then, so its counters started at 0 in between and it has a
//! rate at once (a deploy draws as one line handing over to the next, without a gap). A group
//! seen for the first time has no rate yet (its counters may predate the window: adopted
//! after a restart of the agent); a gap (a group or generation absent from a sample) is kept
//! as a gap, never drawn as zero.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use reuseport_proto::addr::GroupKey;

use super::sample::Sample;

/// Samples kept: five minutes at one sample a second.
pub const WINDOW: usize = 300;

/// New connections per second of one generation, one value per sample of the window (`None`
/// where the generation had no rate).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Series {
    pub generation: u32,
    pub rates: Vec<Option<f64>>,
}

/// What one group's chart shows.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GroupChart {
    /// Unix times of the samples, seconds, oldest first.
    pub times: Vec<f64>,
    pub series: Vec<Series>,
}

#[derive(Default)]
pub struct History {
    /// Unix time of each sample in the window, oldest first.
    times: VecDeque<f64>,
    groups: BTreeMap<GroupKey, GroupHistory>,
}

#[derive(Default)]
struct GroupHistory {
    /// New connections (cumulative) per generation at the previous sample.
    last: BTreeMap<u32, u64>,
    /// One value per sample of the window, aligned with [`History::times`].
    series: BTreeMap<u32, VecDeque<Option<f64>>>,
}

impl History {
    /// Adds `sample` to the window (the oldest sample leaves once it is full).
    pub fn record(&mut self, sample: &Sample) {
        let now = unix_seconds(sample.at);
        let dt = self.times.back().map(|prev| now - prev);
        let len = self.times.len();
        self.times.push_back(now);
        for g in &sample.groups {
            let h = self.groups.entry(g.key).or_default();
            let group_was_seen = !h.last.is_empty();
            let mut seen = BTreeMap::new();
            for generation in &g.status.generations {
                let c = generation.counters;
                let total = c.selected + c.fallback;
                seen.insert(generation.generation, total);
                let before = match h.last.get(&generation.generation) {
                    Some(before) => Some(*before),
                    None if group_was_seen => Some(0),
                    None => None,
                };
                let rate = match (before, dt) {
                    (Some(before), Some(dt)) if dt > 0.0 => {
                        Some(total.saturating_sub(before) as f64 / dt)
                    }
                    _ => None,
                };
                h.series
                    .entry(generation.generation)
                    .or_insert_with(|| std::iter::repeat_n(None, len).collect())
                    .push_back(rate);
            }
            h.last = seen;
        }
        for (key, h) in &mut self.groups {
            if !sample.groups.iter().any(|g| g.key == *key) {
                h.last.clear();
            }
            for values in h.series.values_mut() {
                if values.len() <= len {
                    values.push_back(None);
                }
            }
        }
        if self.times.len() > WINDOW {
            self.times.pop_front();
            for h in self.groups.values_mut() {
                for values in h.series.values_mut() {
                    values.pop_front();
                }
                h.series.retain(|_, v| v.iter().any(Option::is_some));
            }
        }
        self.groups
            .retain(|_, h| !h.last.is_empty() || !h.series.is_empty());
    }

    /// The chart of `group` (empty while the window holds nothing of it).
    pub fn chart(&self, group: &GroupKey) -> GroupChart {
        GroupChart {
            times: self.times.iter().copied().collect(),
            series: self
                .groups
                .get(group)
                .map(|h| {
                    h.series
                        .iter()
                        .map(|(generation, rates)| Series {
                            generation: *generation,
                            rates: rates.iter().copied().collect(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

pub fn unix_seconds(at: std::time::SystemTime) -> f64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use reuseport_proto::{Counters, GenerationStatus, GroupStatus, message::GenState};

    use super::*;
    use crate::metrics::sample::GroupSample;

    fn key() -> GroupKey {
        GroupKey {
            addr: "127.0.0.1:80".parse().unwrap(),
            netns: 1,
        }
    }

    /// A sample at second `t` with `(generation, selected)` of each generation.
    fn sample(t: u64, generations: &[(u32, u64)]) -> Sample {
        Sample {
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(t),
            took: Duration::ZERO,
            groups: vec![GroupSample {
                key: key(),
                flips: 0,
                status: GroupStatus {
                    group: key().to_addr(),
                    mode: "select-or-migrate".into(),
                    active: None,
                    falling_back: false,
                    unsteered: 0,
                    limits: None,
                    last_restart: None,
                    live: None,
                    generations: generations
                        .iter()
                        .map(|&(generation, selected)| GenerationStatus {
                            generation,
                            name: None,
                            state: GenState::Active,
                            sockets: Vec::new(),
                            counters: Counters {
                                selected,
                                fallback: 1,
                                migrated: 1000,
                            },
                            live: None,
                            drain: None,
                            also_in: Vec::new(),
                            weight: None,
                            health: None,
                        })
                        .collect(),
                },
            }],
        }
    }

    /// A deploy: generation 1's rate falls to 0 as generation 2's rises; the group's first
    /// sample has no rate, a generation that registered since the previous sample has one
    /// (from 0), and the time before it appeared has none.
    #[test]
    fn a_deploy_is_one_series_handing_over_to_the_next() {
        let mut h = History::default();
        h.record(&sample(0, &[(1, 0)]));
        h.record(&sample(2, &[(1, 200)]));
        h.record(&sample(3, &[(1, 300), (2, 10)]));
        h.record(&sample(4, &[(1, 300), (2, 160)]));
        let chart = h.chart(&key());
        assert_eq!(chart.times, [0.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            chart.series,
            [
                Series {
                    generation: 1,
                    rates: vec![None, Some(100.0), Some(100.0), Some(0.0)]
                },
                Series {
                    generation: 2,
                    rates: vec![None, None, Some(11.0), Some(150.0)]
                },
            ]
        );
    }

    /// The window is bounded; a generation whose values all left it is dropped, and so is a
    /// group that is gone.
    #[test]
    fn the_window_keeps_the_last_samples_only() {
        let mut h = History::default();
        h.record(&sample(0, &[(1, 0)]));
        h.record(&sample(1, &[(1, 10)]));
        for t in 2..(WINDOW as u64 + 10) {
            h.record(&sample(t, &[(2, t)]));
        }
        let chart = h.chart(&key());
        assert_eq!(chart.times.len(), WINDOW);
        assert!(chart.series.iter().all(|s| s.rates.len() == WINDOW));
        assert_eq!(
            chart
                .series
                .iter()
                .map(|s| s.generation)
                .collect::<Vec<_>>(),
            [2],
            "generation 1 left the window"
        );
        let empty = Sample {
            groups: Vec::new(),
            ..sample(0, &[])
        };
        for _ in 0..=WINDOW {
            h.record(&empty);
        }
        assert!(
            h.groups.is_empty(),
            "a group gone for a whole window is forgotten"
        );
    }
}
