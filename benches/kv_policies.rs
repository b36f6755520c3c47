//! One compression at the demo model's shape (30 layers, 3 KV heads of 64):
//! stage 1 on a 1024-entry prompt down to keep 0.2, and one stage-2 eviction
//! during generation. Only the compression is timed; refilling the pool is
//! not.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use elastic_edge::kv::{
    KeepRatio, KvCache, KvDtype, KvElement, KvPool, KvShape, PolicyConfig, PolicyKind, PoolBacking,
};
use half::f16;

const PROMPT: usize = 1024;
const KEEP: f64 = 0.2;

fn pseudo_random(i: u64) -> f32 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 40) % 1000) as f32 / 1000.0
}

fn new_cache(kind: PolicyKind, dtype: KvDtype) -> KvCache {
    let shape = KvShape::smollm2_135m(dtype);
    let pool = KvPool::with_capacity(shape, PROMPT + 64, &PoolBacking::Anonymous).expect("pool");
    KvCache::new(
        pool,
        kind,
        &PolicyConfig::default(),
        KeepRatio::new(KEEP).expect("ratio"),
    )
    .expect("cache")
}

/// One decoder step of `t` tokens with synthetic K/V and attention.
fn step<E: KvElement>(cache: &mut KvCache, t: usize, colsum: &mut Vec<f32>) {
    let first = cache.processed() as u64;
    let pool = cache.pool_mut();
    let (row, len) = (pool.shape().row_len(), pool.len());
    let (mut key, mut value) = (vec![E::from_f32(0.0); row], vec![E::from_f32(0.0); row]);
    for layer in 0..pool.shape().layers {
        for slot in 0..t {
            for (j, (k, v)) in key.iter_mut().zip(value.iter_mut()).enumerate() {
                let seed = first * 7919 + layer as u64 * 104_729 + (slot * row + j) as u64;
                *k = E::from_f32(pseudo_random(seed));
                *v = E::from_f32(-pseudo_random(seed + 1));
            }
            pool.write_free_row(layer, len + slot, &key, &value).expect("room");
        }
    }
    cache.commit(t).expect("commit");
    if cache.wants_scores() {
        for layer in 0..cache.pool().shape().layers {
            colsum.clear();
            colsum.extend((0..cache.pool().len()).map(|j| pseudo_random(first + (layer * 4099 + j) as u64)));
            cache.add_scores(layer, colsum).expect("scores");
        }
    }
}

fn refill<E: KvElement>(cache: &mut KvCache, colsum: &mut Vec<f32>) {
    cache.reset();
    step::<E>(cache, PROMPT, colsum);
}

fn prompt_compression<E: KvElement>(c: &mut Criterion, name: &str) {
    let mut group = c.benchmark_group(format!("prompt_1024_to_keep_0.2/{name}"));
    for kind in [PolicyKind::Elastic, PolicyKind::H2o, PolicyKind::Local] {
        let mut cache = new_cache(kind, E::DTYPE);
        let mut colsum = Vec::with_capacity(PROMPT + 64);
        group.bench_function(BenchmarkId::from_parameter(kind), |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    refill::<E>(&mut cache, &mut colsum);
                    let start = Instant::now();
                    cache.end_prompt().expect("compress");
                    timed += start.elapsed();
                    black_box(cache.pool().len());
                }
                timed
            })
        });
    }
    group.finish();
}

fn decode_eviction<E: KvElement>(c: &mut Criterion, name: &str) {
    let mut group = c.benchmark_group(format!("decode_eviction/{name}"));
    for kind in [PolicyKind::Elastic, PolicyKind::H2o, PolicyKind::Local] {
        let mut cache = new_cache(kind, E::DTYPE);
        let mut colsum = Vec::with_capacity(PROMPT + 64);
        refill::<E>(&mut cache, &mut colsum);
        cache.end_prompt().expect("compress");
        group.bench_function(BenchmarkId::from_parameter(kind), |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                let mut evictions = 0;
                while evictions < iterations {
                    if cache.pool().free() < 2 {
                        refill::<E>(&mut cache, &mut colsum);
                        cache.end_prompt().expect("compress");
                    }
                    step::<E>(&mut cache, 1, &mut colsum);
                    let pool = cache.pool();
                    if cache.keep().excess(pool.len(), cache.processed()) == 0 {
                        continue;
                    }
                    let start = Instant::now();
                    cache.end_token().expect("evict");
                    timed += start.elapsed();
                    evictions += 1;
                }
                timed
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    prompt_compression::<f16>(c, "f16");
    prompt_compression::<f32>(c, "f32");
    decode_eviction::<f16>(c, "f16");
    decode_eviction::<f32>(c, "f32");
}

criterion_group! {
    name = kv;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(kv);
