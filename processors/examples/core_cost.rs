//! Instructions per reading of the aggregation core, for use under
//! `valgrind --tool=callgrind`, whose counts do not depend on what else the
//! machine is doing (unlike a timed benchmark on a shared 2-core machine).
//!
//! `cargo build --release -p processors --example core_cost &&
//!  valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!    target/release/examples/core_cost 20 && callgrind_annotate /tmp/cg.out | head`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use processors::store::RollupStore;
use rollup::AggregateConfig;
use rollup::aggregate::fold;
use rollup::keys::ItemKey;
use testkit::batches::warm_busy_shard;

// The allocator iotpipe's binaries use: the core allocates per batch, and
// glibc's malloc costs several times more under this churn.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let per_record: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let records = 20_000 / per_record;
    let cfg = AggregateConfig::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (store, next) = warm_busy_shard(&rt, &cfg, records, per_record);
    let load = |keys: &[ItemKey]| rt.block_on(store.load(keys)).unwrap();
    let started = std::time::Instant::now();
    let out = fold("shard-0000", &next, &cfg, load).unwrap();
    let elapsed = started.elapsed();
    println!(
        "{} readings in {} records, {} writes, {:?} ({:.0} readings/s)",
        records * per_record,
        records,
        out.commit.len(),
        elapsed,
        (records * per_record) as f64 / elapsed.as_secs_f64()
    );
}
