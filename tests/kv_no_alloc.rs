//! The decode loop's cache work allocates nothing: making room, committing
//! a token, adding its attention, and evicting at the keep ratio, for every
//! compressing policy.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::prefill;
use elastic_edge::kv::{KvDtype, PolicyConfig, PolicyKind};

/// Counts allocations made by a thread while its `COUNTING` is set: only
/// the test's own thread (the harness's other threads allocate when they
/// like, which made a global flag flaky).
struct CountingAllocator;

thread_local! {
    // Const-initialised: reading it never allocates.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn counting(on: bool) {
    COUNTING.with(|c| c.set(on));
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: a thread being torn down has no flag left (not counting).
        if COUNTING.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn decode_steps_do_not_allocate() {
    // The counter counts.
    counting(true);
    let probe = std::hint::black_box(Box::new(1u64));
    counting(false);
    drop(probe);
    assert_eq!(ALLOCATIONS.swap(0, Ordering::Relaxed), 1);

    for dtype in [KvDtype::F16, KvDtype::F32] {
        for (kind, merge_on_evict) in [
            (PolicyKind::Local, false),
            (PolicyKind::H2o, false),
            (PolicyKind::Elastic, false),
            (PolicyKind::Elastic, true),
            (PolicyKind::ElasticPaper, false),
            (PolicyKind::ElasticPaper, true),
            (PolicyKind::ElasticRef, false),
        ] {
            let config = PolicyConfig {
                merge_on_evict,
                ..PolicyConfig::default()
            };
            // A small pool so both the keep ratio and the capacity evict.
            let mut cache = common::cache(common::shape(4, dtype), 48, kind, &config, 0.3);
            let mut attention = |_: usize, p: u32| (p % 5) as f32;
            prefill(&mut cache, 100, &mut attention);
            let layers = cache.pool().shape().layers;
            let colsum = vec![0.25f32; cache.pool().capacity()];
            for _ in 0..200 {
                counting(true);
                cache.begin_token().unwrap();
                // The decoder binds these blocks as its cache and appends in place.
                let bound = match dtype {
                    KvDtype::F16 => cache
                        .pool_mut()
                        .cache_blocks::<half::f16>()
                        .map(|blocks| blocks.count()),
                    KvDtype::F32 => cache.pool_mut().cache_blocks::<f32>().map(|blocks| blocks.count()),
                };
                assert_eq!(bound.unwrap(), layers);
                cache.commit(1).unwrap();
                if cache.wants_scores() {
                    let len = cache.pool().len();
                    for layer in 0..layers {
                        cache.add_scores(layer, &colsum[..len]).unwrap();
                    }
                }
                cache.end_token().unwrap();
                counting(false);
            }
            assert!(cache.stats().evicted + cache.stats().merged > 0);
            assert_eq!(
                ALLOCATIONS.load(Ordering::Relaxed),
                0,
                "{kind} ({dtype:?}) allocated in the decode loop"
            );
        }
    }
}
