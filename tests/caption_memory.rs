//! Many captions in one process: the pool never exceeds its budget and the
//! resident memory stops growing after warm-up. A test binary of its own so
//! no other test's allocations run in the same process meanwhile.

use std::path::PathBuf;

use elastic_edge::generate::{GenerateParams, Generator, ImageInput, Sampling};
use elastic_edge::kv::{KeepRatio, KvCache, KvPool, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::model::{LoadOptions, Model};

#[test]
fn pool_stays_within_budget_and_memory_does_not_grow() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let options = LoadOptions {
        threads: Some(1),
        ..LoadOptions::default()
    };
    let mut model = Model::load(&repo.join("models/tiny"), &options).unwrap();
    let budget = 64 * 1024;
    let pool = KvPool::with_budget(model.manifest.kv_shape(), budget, &PoolBacking::Anonymous).unwrap();
    let cache = KvCache::new(
        pool,
        PolicyKind::Elastic,
        &PolicyConfig::default(),
        KeepRatio::new(0.3).unwrap(),
    )
    .unwrap();
    let mut generator = Generator::new(&mut model, cache).unwrap();
    let image = repo.join("models/tiny/gradient.png");
    let params = GenerateParams {
        max_new_tokens: 40,
        sampling: Sampling::GREEDY,
        stop_strings: Vec::new(),
        ignore_stop: false,
    };
    let mut rss_after_warmup = 0;
    for round in 0..60 {
        let generation = generator
            .generate(
                &[ImageInput::File(&image)],
                Some("Describe the picture."),
                &params,
                &mut |_| {},
            )
            .unwrap();
        assert!(generation.pool_bytes <= budget);
        assert!(generation.cache.peak_len <= generation.pool_capacity);
        if round == 10 {
            rss_after_warmup = rss_bytes();
        }
    }
    let growth = rss_bytes().saturating_sub(rss_after_warmup);
    assert!(growth < 1 << 20, "RSS grew by {growth} bytes over 50 captions");
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
