//! The `elastic-edge` command line: parse, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use elastic_edge::error::error_chain;
use elastic_edge::kv::{KeepRatio, KvBudget, KvCache, KvDtype, KvPool, KvShape, PolicyConfig, PolicyKind, PoolBacking};
use elastic_edge::runtime;

#[derive(Parser)]
#[command(
    name = "elastic-edge",
    version,
    about = "Vision-language inference for edge devices with a fixed, Elastic-Cache-compressed KV pool",
    long_about = "Runs vision-language models exported to ONNX with ONNX Runtime. The KV cache is one \
                  memory-mapped pool sized once from a byte budget; Elastic Cache (importance-driven \
                  merging) keeps any keep ratio within that budget."
)]
struct Cli {
    /// ONNX Runtime library to load (default: ORT_DYLIB_PATH, next to the
    /// binary, the checkout's .cache/onnxruntime, then the system path).
    #[arg(long, global = true, value_name = "PATH")]
    onnxruntime: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the set-up: which ONNX Runtime loads, and what a KV budget buys.
    Doctor(DoctorArgs),
}

#[derive(Args)]
struct DoctorArgs {
    #[command(flatten)]
    pool: PoolArgs,

    /// Cache policy whose protected entries the budget must hold.
    #[arg(long, default_value = "elastic", value_parser = parse_policy)]
    policy: PolicyKind,

    /// Fraction of processed tokens the cache keeps, in (0, 1].
    #[arg(long, default_value = "0.5", value_parser = parse_keep)]
    keep: KeepRatio,
}

/// The KV pool's geometry and budget. The geometry defaults to the demo
/// model's decoder (SmolLM2-135M: 30 layers, 3 KV heads of 64).
#[derive(Args)]
struct PoolArgs {
    /// KV pool budget: bytes (64MiB, 1.5GB, 65536) or slots (4096tokens).
    #[arg(long, default_value = "64MiB", value_parser = parse_budget)]
    kv_budget: KvBudget,

    /// Back the pool with this file (e.g. /dev/shm/elastic-edge.kv) instead
    /// of anonymous memory.
    #[arg(long, value_name = "PATH")]
    kv_file: Option<PathBuf>,

    #[arg(long, default_value_t = 30)]
    layers: usize,
    #[arg(long, default_value_t = 3)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Element type of the cache: f16 or f32.
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    dtype: KvDtype,
}

fn parse_budget(s: &str) -> Result<KvBudget, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn parse_keep(s: &str) -> Result<KeepRatio, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn parse_dtype(s: &str) -> Result<KvDtype, String> {
    s.parse().map_err(|e: elastic_edge::Error| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the context, then each cause not already quoted.
            eprintln!("elastic-edge: {}", error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Doctor(args) => doctor(cli.onnxruntime.as_deref(), &args),
    }
}

fn doctor(onnxruntime: Option<&std::path::Path>, args: &DoctorArgs) -> anyhow::Result<()> {
    let library = runtime::load(onnxruntime)?;
    println!("onnxruntime: {}", library.path.display());
    println!("  found by: {}", library.found_by);
    println!("  build: {}", library.build_info);

    let pool_args = &args.pool;
    let shape = KvShape {
        layers: pool_args.layers,
        kv_heads: pool_args.kv_heads,
        head_dim: pool_args.head_dim,
        dtype: pool_args.dtype,
    };
    shape.validate()?;
    let backing = match &pool_args.kv_file {
        Some(path) => PoolBacking::File(path.clone()),
        None => PoolBacking::Anonymous,
    };
    let budget = pool_args.kv_budget.bytes(shape.bytes_per_slot());
    let pool = KvPool::with_budget(shape, budget, &backing)
        .with_context(|| format!("sizing the KV pool from {}", pool_args.kv_budget))?;
    let cache = KvCache::new(pool, args.policy, &PolicyConfig::default(), args.keep)?;
    let pool = cache.pool();
    println!(
        "kv pool: {} slots, {} bytes ({} per slot)",
        pool.capacity(),
        pool.bytes(),
        shape.bytes_per_slot()
    );
    println!(
        "  shape: {} layers x {} kv heads x {} dims, {}",
        shape.layers,
        shape.kv_heads,
        shape.head_dim,
        shape.dtype.name()
    );
    println!(
        "  policy {} at keep {}: holds a sequence of up to {} processed tokens before the budget binds",
        args.policy,
        cache.keep().get(),
        (pool.capacity() as f64 / cache.keep().get()).floor()
    );
    Ok(())
}
