//! Which shard leases a process takes, renews and gives up: pure, with the
//! time as an argument, so every case is a plain test.
//!
//! The rules, the KCL's without its stealing:
//! - a lease is expired when its owner is gone or its counter has not moved
//!   for a lease duration since this process first saw that value (its own
//!   clock, never compared with another process's);
//! - the live processes are this one and every owner of an unexpired lease or
//!   heartbeat; each should hold at most `ceil(shards / live)` leases;
//! - a process takes free and expired leases up to that share, renews its
//!   own, never takes a lease that is alive, and gives up what it holds
//!   beyond its share, so that a newcomer finds leases free;
//! - finished shards (`SHARD_END`) count for nobody.

use std::collections::{BTreeSet, HashMap};

use super::{Checkpoint, Lease, LeaseSnapshot};

/// What a process should do with the lease table now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeasePlan {
    /// Leases this process holds and keeps.
    pub renew: Vec<String>,
    /// Free or expired leases to take, each with the counter seen (`None`:
    /// the shard has no lease item yet), which the take is conditional on.
    pub take: Vec<(String, Option<u64>)>,
    /// Leases this process holds beyond its share, or on finished shards.
    pub release: Vec<String>,
}

/// Remembers when each counter was first seen at its value, which is what
/// expiry is measured from.
#[derive(Debug, Clone)]
pub struct LeasePlanner {
    owner: String,
    lease_duration_ms: i64,
    /// Per lease or heartbeat key: the counter last seen and when it was
    /// first seen at that value.
    seen: HashMap<String, (u64, i64)>,
}

impl LeasePlanner {
    pub fn new(owner: impl Into<String>, lease_duration_ms: i64) -> Self {
        LeasePlanner {
            owner: owner.into(),
            lease_duration_ms,
            seen: HashMap::new(),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Notes a counter and says whether it has stood still for a lease
    /// duration.
    fn observe(&mut self, key: String, counter: u64, now_ms: i64) -> bool {
        let since = match self.seen.get(&key) {
            Some((c, since)) if *c == counter => *since,
            _ => {
                self.seen.insert(key, (counter, now_ms));
                now_ms
            }
        };
        now_ms.saturating_sub(since) >= self.lease_duration_ms
    }

    /// The plan for `shards` (the stream's shards now) given the table's
    /// `snapshot`, at `now_ms` on this process's clock.
    pub fn plan(&mut self, shards: &[String], snapshot: &LeaseSnapshot, now_ms: i64) -> LeasePlan {
        let by_shard: HashMap<&str, &Lease> = snapshot
            .leases
            .iter()
            .map(|l| (l.shard.as_str(), l))
            .collect();
        let mut live: BTreeSet<String> = BTreeSet::from([self.owner.clone()]);
        for beat in &snapshot.heartbeats {
            let stale = self.observe(format!("worker#{}", beat.owner), beat.counter, now_ms);
            if !stale {
                live.insert(beat.owner.clone());
            }
        }
        let mut plan = LeasePlan::default();
        let mut mine = Vec::new();
        let mut free = Vec::new();
        let mut active = 0usize;
        for shard in shards {
            let Some(lease) = by_shard.get(shard.as_str()) else {
                active += 1;
                free.push((shard.clone(), None));
                continue;
            };
            let stale = self.observe(shard.clone(), lease.counter, now_ms);
            let owned = lease.owner.as_deref() == Some(self.owner.as_str());
            if lease.checkpoint == Some(Checkpoint::ShardEnd) {
                if owned {
                    plan.release.push(shard.clone());
                }
                continue;
            }
            active += 1;
            match &lease.owner {
                _ if owned => mine.push(shard.clone()),
                Some(owner) if !stale => {
                    live.insert(owner.clone());
                }
                _ => free.push((shard.clone(), Some(lease.counter))),
            }
        }
        // Forget shards that left the stream.
        self.seen
            .retain(|key, _| key.starts_with("worker#") || shards.contains(key));
        let share = active.div_ceil(live.len());
        if mine.len() > share {
            plan.release.extend(mine.split_off(share));
        }
        let room = share - mine.len();
        plan.take = free.into_iter().take(room).collect();
        plan.renew = mine;
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Heartbeat;

    const DURATION: i64 = 10_000;

    fn shards(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("shard-{i}")).collect()
    }

    fn lease(shard: &str, owner: Option<&str>, counter: u64) -> Lease {
        Lease {
            shard: shard.into(),
            owner: owner.map(Into::into),
            counter,
            checkpoint: None,
        }
    }

    fn beat(owner: &str, counter: u64) -> Heartbeat {
        Heartbeat {
            owner: owner.into(),
            counter,
        }
    }

    #[test]
    fn alone_it_takes_every_shard() {
        let mut a = LeasePlanner::new("a", DURATION);
        let plan = a.plan(&shards(4), &LeaseSnapshot::default(), 0);
        assert_eq!(plan.take.len(), 4);
        assert!(plan.take.iter().all(|(_, seen)| seen.is_none()));
        assert!(plan.renew.is_empty() && plan.release.is_empty());
    }

    #[test]
    fn it_steals_nothing_alive_and_a_crowded_owner_gives_up_its_excess() {
        let all = shards(4);
        let held_by_a = LeaseSnapshot {
            leases: all.iter().map(|s| lease(s, Some("a"), 1)).collect(),
            heartbeats: vec![beat("a", 1), beat("b", 1)],
        };
        // b sees a alive everywhere: it takes nothing.
        let mut b = LeasePlanner::new("b", DURATION);
        let plan = b.plan(&all, &held_by_a, 0);
        assert!(plan.take.is_empty(), "{plan:?}");
        // a sees b's heartbeat: two live processes, a share of two.
        let mut a = LeasePlanner::new("a", DURATION);
        let plan = a.plan(&all, &held_by_a, 0);
        assert_eq!(plan.renew, ["shard-0", "shard-1"]);
        assert_eq!(plan.release, ["shard-2", "shard-3"]);
        // Released, the two are free for b.
        let mut after = held_by_a.clone();
        after.leases[2] = lease("shard-2", None, 2);
        after.leases[3] = lease("shard-3", None, 2);
        let plan = b.plan(&all, &after, 1);
        assert_eq!(
            plan.take,
            [("shard-2".into(), Some(2)), ("shard-3".into(), Some(2))]
        );
    }

    #[test]
    fn a_dead_owners_leases_expire_on_the_observers_clock() {
        let all = shards(4);
        let snapshot = LeaseSnapshot {
            leases: vec![
                lease("shard-0", Some("a"), 7),
                lease("shard-1", Some("a"), 7),
                lease("shard-2", Some("b"), 3),
                lease("shard-3", Some("b"), 3),
            ],
            heartbeats: vec![beat("a", 5), beat("b", 9)],
        };
        let mut b = LeasePlanner::new("b", DURATION);
        assert!(b.plan(&all, &snapshot, 1_000).take.is_empty());
        // Just short of the duration: still alive.
        let mut renewed_b = snapshot.clone();
        renewed_b.leases[2].counter = 4;
        renewed_b.leases[3].counter = 4;
        renewed_b.heartbeats[1].counter = 10;
        assert!(
            b.plan(&all, &renewed_b, 1_000 + DURATION - 1)
                .take
                .is_empty()
        );
        // a's counters stood still for the whole duration: b takes them.
        let plan = b.plan(&all, &renewed_b, 1_000 + DURATION);
        assert_eq!(
            plan.take,
            [("shard-0".into(), Some(7)), ("shard-1".into(), Some(7))]
        );
        assert_eq!(plan.renew, ["shard-2", "shard-3"]);
    }

    #[test]
    fn a_moving_counter_keeps_a_lease_alive_and_finished_shards_count_for_nobody() {
        let all = shards(3);
        let mut snapshot = LeaseSnapshot {
            leases: vec![lease("shard-0", Some("a"), 1), lease("shard-1", None, 1)],
            heartbeats: vec![beat("a", 1)],
        };
        snapshot.leases.push(Lease {
            checkpoint: Some(Checkpoint::ShardEnd),
            ..lease("shard-2", Some("b"), 1)
        });
        let mut b = LeasePlanner::new("b", DURATION);
        for t in 0..5 {
            snapshot.leases[0].counter += 1;
            snapshot.heartbeats[0].counter += 1;
            let plan = b.plan(&all, &snapshot, t * DURATION);
            // Two live processes, two unfinished shards: one each.
            assert_eq!(plan.take, [("shard-1".into(), Some(1))], "at {t}");
            assert_eq!(plan.release, ["shard-2"]);
        }
    }
}
