//! Counter items for the stores' unit tests: the smallest item whose value
//! a test can check. (Integration tests use `testkit::store_conformance`,
//! which unit tests cannot: it links another instance of this crate.)

use rollup::keys::ItemKey;
use rollup::{Commit, Condition, Write};
use schemas::state::{Item, ItemState};

pub fn counter_key(name: &str) -> ItemKey {
    ItemKey::Counter {
        shard: "s".into(),
        name: name.into(),
    }
}

/// A write of the counter value `n`, kept forever.
pub fn write(key: ItemKey, condition: Condition, n: u64) -> Write {
    Write {
        key,
        condition,
        item: Item {
            applied: Default::default(),
            state: ItemState::Counter(n),
        },
        expires_at: None,
    }
}

/// A commit of that one write to the counter `name`.
pub fn counter(name: &str, condition: Condition, n: u64) -> Commit {
    Commit {
        writes: vec![write(counter_key(name), condition, n)],
        then: vec![],
    }
}
