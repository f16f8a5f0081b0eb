//! The wasmtime engine: compilation cache, instance allocation, interruption.
//!
//! Instances come from the pooling allocator: it reserves address space for
//! a fixed number of slots up front, so instantiating is a few microseconds
//! of bookkeeping instead of mmap calls on every request. Where the address
//! space is too small for the pool (small `ulimit -v`, sandboxes), creating
//! the engine fails and we fall back to on-demand allocation with small
//! memory reservations (bounds-checked, growing by moving): slower per
//! request and per access, but it runs where the fast path cannot.
//!
//! Compiled code is kept on disk and mapped from there (`compiled.rs`), so
//! a restart or a re-deploy of an unchanged component skips Cranelift.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::compiled::CompiledCache;
use crate::plugins::MAX_MEMORY_MIB;

/// How often the epoch advances. A deadline is noticed within one tick, and
/// a busy instance yields to others at each tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Instance slots in the pool: the most instances alive at once, across all
/// components. 1000 covers every component's concurrency limit many times.
const POOL_INSTANCES: u32 = 1000;

/// Bytes of an instance's memory kept mapped when its slot is reused: up to
/// this, reuse is a memset instead of a page fault per touched page. With
/// `PAGEMAP_SCAN` (below) only the pages the instance dirtied are reset.
/// Larger sizes measured no faster with hello world and keep more memory
/// in every warm slot.
const KEEP_RESIDENT: usize = 64 * 1024;

/// Address space reserved per memory when the pool cannot be had.
const SMALL_RESERVATION: u64 = 16 * 1024 * 1024;

/// Freed instance slots whose memory is released together. Each release
/// (madvise) makes the kernel interrupt every other core to flush its TLB;
/// batching them measured 10-15% more hello-world requests per second on 2
/// cores. The price is memory: up to this many freed instances keep their
/// dirty pages until the batch is released, so it stays small.
const DECOMMIT_BATCH: usize = 16;

pub struct EngineInfo {
    pub engine: Engine,
    pub pooling: bool,
    pub compiled: CompiledCache,
}

pub fn build(data_dir: &Path) -> Result<EngineInfo> {
    let mut config = Config::new();
    config.epoch_interruption(true);

    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * 4)
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 4)
        .total_stacks(POOL_INSTANCES)
        .max_core_instances_per_component(50)
        .max_memories_per_component(8)
        .max_tables_per_component(16)
        .max_memory_size(MAX_MEMORY_MIB as usize * 1024 * 1024)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .decommit_batch_size(DECOMMIT_BATCH)
        // Linux 6.7+: asks the kernel which pages a freed instance dirtied
        // and resets just those, instead of `madvise` dropping them (a TLB
        // shootdown on every core, and a page fault per page on the next
        // use). Hello world with wrk on 2 cores: 16.6-19.7k -> 26.3-35.9k
        // req/s. Older kernels fall back to the memset and `madvise` above.
        .pagemap_scan(Enabled::Auto);
    let mut pooled = config.clone();
    pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let (engine, pooling) = match Engine::new(&pooled) {
        Ok(engine) => (engine, true),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "pooling allocator unavailable; allocating instances on demand");
            config
                .memory_reservation(SMALL_RESERVATION)
                .memory_guard_size(0)
                .memory_may_move(true);
            (Engine::new(&config)?, false)
        }
    };
    let compiled = CompiledCache::new(
        engine.clone(),
        std::path::absolute(data_dir.join("compiled"))?,
    )?;
    let ticker = engine.weak();
    std::thread::Builder::new()
        .name("agora-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match ticker.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })?;
    Ok(EngineInfo {
        engine,
        pooling,
        compiled,
    })
}
