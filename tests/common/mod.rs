//! Drives a `KvCache` the way the generation loop does, with synthetic K/V
//! and attention sums in place of the decoder graph, so the policies can be
//! checked without a model.

#![allow(dead_code)] // each test binary uses a different part

use elastic_edge::kv::{
    KeepRatio, KvCache, KvDtype, KvElement, KvLayout, KvPool, KvShape, PolicyConfig, PolicyKind, PoolBacking,
};
use half::f16;

/// A small integer (exact in f16 and f32, and so are sums of a few hundred)
/// standing for element `j` of token `position`'s key (value: negated) in
/// `layer`.
pub fn token_value(layer: usize, position: usize, j: usize) -> f32 {
    ((position * 31 + layer * 7 + j * 3) % 17) as f32
}

/// Format 2's layout (one piece per KV head); see [`shape_in`].
pub fn shape(layers: usize, dtype: KvDtype) -> KvShape {
    shape_in(layers, dtype, KvLayout::HeadMajor)
}

pub fn shape_in(layers: usize, dtype: KvDtype, layout: KvLayout) -> KvShape {
    KvShape {
        layers,
        kv_heads: 2,
        head_dim: 2,
        dtype,
        layout,
    }
}

pub fn cache(shape: KvShape, capacity: usize, kind: PolicyKind, config: &PolicyConfig, keep: f64) -> KvCache {
    let pool = KvPool::with_capacity(shape, capacity, &PoolBacking::Anonymous).unwrap();
    KvCache::new(pool, kind, config, KeepRatio::new(keep).unwrap()).unwrap()
}

fn write_new<E: KvElement>(cache: &mut KvCache, t: usize) {
    let first = cache.processed();
    let pool = cache.pool_mut();
    let (row, len) = (pool.shape().row_len(), pool.len());
    let mut key = vec![E::from_f32(0.0); row];
    let mut value = key.clone();
    for layer in 0..pool.shape().layers {
        for i in 0..t {
            for j in 0..row {
                let v = token_value(layer, first + i, j);
                key[j] = E::from_f32(v);
                value[j] = E::from_f32(-v);
            }
            pool.write_free_row(layer, len + i, &key, &value).unwrap();
        }
    }
}

/// One decoder step of `t` tokens: write their K/V into the pool, commit,
/// and report `attention(layer, position)` as each live entry's column sum.
pub fn step(cache: &mut KvCache, t: usize, attention: &mut impl FnMut(usize, u32) -> f32) {
    match cache.pool().shape().dtype {
        KvDtype::F16 => write_new::<f16>(cache, t),
        KvDtype::F32 => write_new::<f32>(cache, t),
    }
    cache.commit(t).unwrap();
    if cache.wants_scores() {
        for layer in 0..cache.pool().shape().layers {
            let colsum: Vec<f32> = cache
                .pool()
                .positions(layer)
                .iter()
                .map(|&p| attention(layer, p))
                .collect();
            cache.add_scores(layer, &colsum).unwrap();
        }
    }
}

/// Encodes a prompt of `len` tokens, in chunks when the pool needs it.
pub fn prefill(cache: &mut KvCache, len: usize, attention: &mut impl FnMut(usize, u32) -> f32) {
    let mut remaining = len;
    while remaining > 0 {
        let t = cache.begin_prompt_chunk(remaining).unwrap();
        step(cache, t, attention);
        remaining -= t;
    }
    cache.end_prompt().unwrap();
}

/// Generates one token.
pub fn decode(cache: &mut KvCache, attention: &mut impl FnMut(usize, u32) -> f32) {
    cache.begin_token().unwrap();
    step(cache, 1, attention);
    cache.end_token().unwrap();
}

/// Element 0 of the key of `slot` in `layer`, as f32.
pub fn key0(cache: &KvCache, layer: usize, slot: usize) -> f32 {
    let pool = cache.pool();
    match pool.shape().dtype {
        KvDtype::F16 => pool.head_row::<f16>(layer, 0, slot, 0).unwrap()[0].to_f32(),
        KvDtype::F32 => pool.head_row::<f32>(layer, 0, slot, 0).unwrap()[0],
    }
}

/// The live positions of a layer in rank order.
pub fn positions_by_rank(cache: &KvCache, layer: usize) -> Vec<u32> {
    let pool = cache.pool();
    pool.order(layer)
        .iter()
        .map(|&s| pool.positions(layer)[s as usize])
        .collect()
}
