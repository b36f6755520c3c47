//! The model: a folder with `manifest.json` (see docs/model-format.md), the
//! decoder and vision graphs, the token-embedding table and the tokenizer.
//! Loading checks everything before the first frame: the manifest against
//! the graph contract, each file's size and sha256, and that the requested
//! execution provider registers.

pub mod decoder;
pub mod embeddings;
pub mod family;
pub mod image;
pub mod manifest;
pub mod mrope;
pub mod prompt;
pub mod providers;
pub mod vision;
pub mod weights;

use std::path::{Path, PathBuf};

use ort::session::{builder::GraphOptimizationLevel, Session};

use crate::error::{error_chain, Error, Result};
use crate::runtime;
pub use decoder::{Decoder, GraphRuns};
pub use embeddings::Embeddings;
pub use manifest::{DecoderFormat, FileCheck, Manifest};
pub use providers::{Device, ProviderOptions};
pub use vision::Vision;

/// The element types a model's tensors come in (f32, f16): what the pool
/// stores and ONNX Runtime reads and writes.
pub trait ModelElement:
    crate::kv::KvElement + ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static
{
}

impl<E> ModelElement for E where
    E: crate::kv::KvElement + ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static
{
}

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub providers: ProviderOptions,
    /// Intra-op threads per session (default: ONNX Runtime's, one per core).
    pub threads: Option<usize>,
    /// ONNX Runtime library to load (see `runtime::load`).
    pub onnxruntime: Option<PathBuf>,
    /// Load only `files.decoder`, not the fast graph beside it.
    pub single_graph: bool,
}

/// A loaded model. Its graphs are its own: the decoder and vision types
/// run them, so no ONNX Runtime type reaches the generation loop.
pub struct Model {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub(crate) decoder: Decoder,
    pub(crate) vision: Option<Vision>,
    pub embeddings: Embeddings,
    pub prompt: prompt::PromptTokenizer,
    pub preprocess: Option<image::Preprocess>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("dir", &self.dir)
            .field("name", &self.manifest.name)
            .finish()
    }
}

impl Model {
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::ModelMissing {
                dir: dir.to_path_buf(),
                reason: "not a folder".into(),
            });
        }
        let manifest = Manifest::load(dir)?;
        let checked = manifest.verify_files(dir)?;
        log::info!("model {}: files check out: {checked}", dir.display());
        let library = runtime::load(options.onnxruntime.as_deref())?;
        check_decoder_support(dir, &manifest, &library.version, options.providers.device)?;
        let decoder = load_decoder(dir, &manifest, library.environment(), options)?;
        let session = |file: &str| build_session(library.environment(), &dir.join(file), options, None);
        let vision = manifest.files.vision.as_deref().map(session).transpose()?;
        if let (Some(file), Some(session), Some(io)) = (&manifest.files.vision, &vision, &manifest.graphs.vision) {
            check_graph(&dir.join(file), "vision", session, io)?;
        }
        let vision = vision.and_then(|session| Vision::new(session, &manifest));
        let embeddings = Embeddings::open(
            &dir.join(&manifest.files.embed_tokens),
            manifest.vocab,
            manifest.hidden,
            manifest.kv_dtype(),
        )?;
        let bos = manifest.bos_token_id;
        let prompt = prompt::PromptTokenizer::from_file(
            &dir.join(&manifest.files.tokenizer),
            manifest.chat_template.clone(),
            bos,
            manifest.add_bos,
        )?
        .with_split_tokens(manifest.split().map(|split| split.tokens.clone()));
        let preprocess = manifest.preprocess();
        release_freed_heap();
        Ok(Model {
            dir: dir.to_path_buf(),
            manifest,
            decoder,
            vision,
            embeddings,
            prompt,
            preprocess,
        })
    }
}

/// Which decoder graphs a load builds sessions for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderGraphs {
    /// `files.decoder`.
    pub main: bool,
    /// `files.decoder_fast`.
    pub fast: bool,
}

/// On the CPU, the graph with attention sums and, when the model has one,
/// the fast graph beside it (unless `single_graph`, or the model is fp16:
/// ONNX Runtime's x86 CPU kernels keep fp32 copies of fp16 weights per
/// session, and its fp16 norms cannot share packed weights, so a second
/// session would double them; the exporter writes no fast graph for fp16).
/// On a GPU a format-2 graph with sums cannot run (its GroupQueryAttention
/// gives no probabilities there), so the fast graph runs alone when there
/// is one.
pub fn decoder_graphs(manifest: &Manifest, device: Device, single_graph: bool) -> DecoderGraphs {
    let has_fast = manifest.files.decoder_fast.is_some();
    if device != Device::Cpu && has_fast && manifest.decoder_format() == DecoderFormat::InPlace {
        return DecoderGraphs {
            main: false,
            fast: true,
        };
    }
    DecoderGraphs {
        main: true,
        fast: has_fast && !single_graph && manifest.kv_dtype() == crate::kv::KvDtype::F32,
    }
}

/// The decoder's sessions over one copy of its weights.
fn load_decoder(
    dir: &Path,
    manifest: &Manifest,
    environment: &ort::environment::Environment,
    options: &LoadOptions,
) -> Result<Decoder> {
    let graphs = decoder_graphs(manifest, options.providers.device, options.single_graph);
    // Two sessions share one mapped copy of the weights and one set of
    // packed weights; one alone reads them itself as ONNX external data.
    let share = graphs.main && graphs.fast;
    let weights = match (&manifest.files.decoder_weights, share) {
        (Some(file), true) => Some(weights::SharedWeights::open(&dir.join(file))?),
        _ => None,
    };
    let session = |file: &str, graph: &str, io: &manifest::GraphIo| -> Result<Session> {
        let path = dir.join(file);
        let session = build_session(environment, &path, options, weights.as_ref())?;
        check_graph(&path, graph, &session, io)?;
        Ok(session)
    };
    let main = graphs
        .main
        .then(|| session(&manifest.files.decoder, "decoder", &manifest.graphs.decoder))
        .transpose()?;
    let fast = match (&manifest.files.decoder_fast, graphs.fast) {
        (Some(file), true) => Some(session(file, "decoder_fast", &manifest.fast_graph_io())?),
        _ => None,
    };
    if let Some(weights) = &weights {
        weights.release_pages();
    }
    Decoder::new(main, fast, weights, manifest)
}

impl Model {
    /// Steps run on each decoder graph since the model was loaded.
    pub fn decoder_graph_runs(&self) -> GraphRuns {
        self.decoder.graph_runs()
    }

    /// Which decoder graph runs, and why: for `doctor` and the logs.
    pub fn decoder_summary(&self) -> String {
        describe_decoder(&self.manifest)
    }
}

/// What the manifest's decoder graph is, in one line.
pub fn describe_decoder(manifest: &Manifest) -> String {
    let scores = manifest.decoder_scores();
    match manifest.decoder_format() {
        DecoderFormat::PastAndNew => format!(
            "format 1 (past read from the pool, new K/V written to its next slots; plain ONNX attention \
             with column sums; ONNX Runtime 1.{} or newer)",
            DecoderFormat::PastAndNew.min_onnxruntime_minor(true)
        ),
        DecoderFormat::InPlace => format!(
            "format 2 (GroupQueryAttention appending to the pool in place{}; ONNX Runtime 1.{} or newer)",
            if scores && manifest.files.decoder_fast.is_some() {
                "; two graphs over one copy of the weights: with attention column sums for the steps H2O and \
                 Elastic Cache score, and a fast one without for every other step (on a GPU the fast one alone: \
                 policies full and local)"
            } else if scores {
                ", with attention column sums for H2O and Elastic Cache"
            } else {
                ", no attention column sums: policies full and local only"
            },
            DecoderFormat::InPlace.min_onnxruntime_minor(scores)
        ),
    }
}

/// The minor version of an ONNX Runtime 1.x version string (`1.31.1`).
fn onnxruntime_minor(version: &str) -> Option<u32> {
    let mut parts = version.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}

/// Refuses, before any graph is loaded, a decoder that the loaded ONNX
/// Runtime or the chosen device cannot run, naming what would.
pub fn check_decoder_support(dir: &Path, manifest: &Manifest, ort_version: &str, device: Device) -> Result<()> {
    let format = manifest.decoder_format();
    // On a GPU the fast graph (no sums) runs alone where there is one.
    let scores = manifest.decoder_scores() && decoder_graphs(manifest, device, false).main;
    let path = dir.join(&manifest.files.decoder);
    let refuse = |reason: String| {
        Err(Error::ModelFile {
            path: path.clone(),
            reason,
        })
    };
    let needed = format.min_onnxruntime_minor(scores);
    if let Some(minor) = onnxruntime_minor(ort_version) {
        if minor < needed {
            return refuse(format!(
                "this decoder is format {} (GroupQueryAttention{}), which needs ONNX Runtime 1.{needed} or newer; \
                 the loaded one is {ort_version}: point ORT_DYLIB_PATH at a newer libonnxruntime.so, or export the \
                 model in format 1 (scripts/build-demo-model.sh --decoder-format 1)",
                manifest.format_version,
                if scores {
                    " with qk_output"
                } else {
                    " with attention_bias and position_ids"
                }
            ));
        }
    }
    if format == DecoderFormat::InPlace && device != Device::Cpu {
        if manifest.kv_dtype() != crate::kv::KvDtype::F16 {
            return refuse(format!(
                "ONNX Runtime's GroupQueryAttention on --device {device} takes float16 only and this decoder is \
                 {}: use the fp16 model on a GPU",
                manifest.dtype
            ));
        }
        if scores {
            return refuse(format!(
                "this decoder outputs attention column sums (qk_output), which GroupQueryAttention on --device \
                 {device} cannot give, and the model has no fast graph without them: export it again (its \
                 decoder_fast.onnx runs policies full and local on the GPU), or in format 1 for H2O and Elastic \
                 Cache on the GPU"
            ));
        }
    }
    Ok(())
}

/// The graph's own inputs and outputs against what its manifest says of
/// them (`graphs.decoder`, `graphs.vision`): the same names, element types,
/// ranks and fixed sizes. A graph that does not match its manifest would
/// otherwise fail at the first caption, as if the picture were at fault.
fn check_graph(path: &Path, graph: &str, session: &Session, io: &manifest::GraphIo) -> Result<()> {
    let mismatch = |reason: String| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!(
            "the {graph} graph does not match its manifest: {reason}; rebuild the model or fix manifest.json"
        ),
    };
    for (side, specs, outlets) in [
        ("input", &io.inputs, session.inputs()),
        ("output", &io.outputs, session.outputs()),
    ] {
        for spec in specs {
            let field = format!("graphs.{graph}.{side}s");
            let Some(outlet) = outlets.iter().find(|o| o.name() == spec.name) else {
                let names: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
                return Err(mismatch(format!(
                    "{field} lists {:?}, which the graph has no {side} of (it has {names:?})",
                    spec.name
                )));
            };
            let ort::value::ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
                return Err(mismatch(format!("{side} {:?} is not a tensor", spec.name)));
            };
            let graph_dtype = match ty {
                ort::value::TensorElementType::Float32 => "float32",
                ort::value::TensorElementType::Float16 => "float16",
                ort::value::TensorElementType::Bfloat16 => "bfloat16",
                ort::value::TensorElementType::Int64 => "int64",
                ort::value::TensorElementType::Int32 => "int32",
                ort::value::TensorElementType::Uint8 => "uint8",
                _ => "another type",
            };
            if graph_dtype != spec.dtype {
                return Err(mismatch(format!(
                    "{side} {:?} is {graph_dtype} in the graph, {} in {field}",
                    spec.name, spec.dtype
                )));
            }
            // A size the graph fixes must be the manifest's; a dynamic one
            // (-1) takes whatever the manifest says.
            let fits = shape.len() == spec.shape.len()
                && shape.iter().zip(&spec.shape).all(|(got, want)| match want.as_u64() {
                    Some(want) => *got < 0 || u64::try_from(*got) == Ok(want),
                    None => true,
                });
            if !fits {
                let graph_dims: Vec<String> = shape
                    .iter()
                    .map(|d| if *d < 0 { "?".to_string() } else { d.to_string() })
                    .collect();
                let manifest_dims: Vec<String> = spec
                    .shape
                    .iter()
                    .map(|d| {
                        d.as_u64()
                            .map_or_else(|| d.as_str().unwrap_or("?").to_string(), |n| n.to_string())
                    })
                    .collect();
                return Err(mismatch(format!(
                    "{side} {:?} has shape [{}] in the graph, [{}] in {field}",
                    spec.name,
                    graph_dims.join(", "),
                    manifest_dims.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// A session for the graph at `path`; with `weights`, its initializers are
/// those shared values (and its packed weights shared with the other graph).
fn build_session(
    environment: &ort::environment::Environment,
    path: &Path,
    options: &LoadOptions,
    weights: Option<&weights::SharedWeights>,
) -> Result<Session> {
    let fail = |what: &str, reason: String| Error::Runtime {
        context: format!("{what} for {}", path.display()),
        reason,
    };
    let providers = providers::dispatch(&options.providers)?;
    let mut builder = Session::builder(environment)
        .map_err(|e| fail("creating a session", error_chain(&e)))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| fail("setting the optimization level", e.to_string()))?
        // Memory patterns plan one block per set of input shapes seen before;
        // ours change every step, so the plans only fragmented the arena: a
        // second 2048-token prompt took 500 MiB more (docs/performance.md).
        .with_memory_pattern(false)
        .map_err(|e| fail("turning memory patterns off", e.to_string()))?;
    if let Some(threads) = options.threads {
        check_threads(threads).map_err(|reason| fail("setting threads", reason))?;
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| fail("setting threads", e.to_string()))?;
    }
    builder = builder.with_execution_providers(providers).map_err(|e| {
        fail(
            &format!("registering the {} execution provider", options.providers.device),
            error_chain(&e),
        )
    })?;
    if let Some(weights) = weights {
        builder = weights.add_to(builder)?;
    }
    builder
        .commit_from_file(path)
        .map_err(|e| fail("loading the graph", error_chain(&e)))
}

/// The most intra-op threads a graph may be given: the CPUs this process
/// may run on (its affinity and cgroup quota counted).
pub fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// A thread count must be at least 1 and at most [`max_threads`]: more
/// threads than CPUs only contend (100000 ran for minutes and took GBs).
pub fn check_threads(threads: usize) -> std::result::Result<(), String> {
    let max = max_threads();
    if threads == 0 {
        return Err("must be at least 1 (leave it out for one per core)".into());
    }
    if threads > max {
        return Err(format!("{threads} is more than the {max} CPUs this process may use"));
    }
    Ok(())
}

/// Returns the heap freed while ONNX Runtime optimised the graphs to the
/// kernel. glibc keeps freed memory for reuse, and after loading the fp32
/// demo model about 245 MiB of it would stay resident for the life of the
/// process (docs/performance.md, "Memory").
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only walks glibc's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Where `caption` looks for a model when `--model` is not given: the
/// `ELASTIC_EDGE_MODEL` variable, then `.cache/models/demo-fp32` of the
/// checkout the binary was built in (where scripts/build-demo-model.sh
/// writes it).
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ELASTIC_EDGE_MODEL").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let fallback = PathBuf::from(".cache/models/demo-fp32");
    let Ok(exe) = std::env::current_exe() else {
        return fallback;
    };
    exe.ancestors()
        .skip(2)
        .take(3)
        .map(|dir| dir.join(".cache/models/demo-fp32"))
        .find(|dir| dir.join("manifest.json").is_file())
        .unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `manifest` fuzz target: an unknown field whose name
    /// holds a line break made a two-line error.
    #[test]
    fn a_manifest_error_quoting_a_line_break_is_one_line() {
        let text = "{\"format\": \"elastic-edge-model\", \"chat_template\": {\"sys\\ntem\": 1}}";
        let err = Manifest::parse(text, Path::new("m/manifest.json"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains(['\n', '\r']), "{err:?}");
    }

    /// A fast graph comes with the weights it shares, beside a format-2
    /// graph with scores; one field without the other, or beside a graph
    /// that has no sums, is one manifest error naming the field.
    #[test]
    fn a_fast_graph_needs_its_shared_weights_and_a_graph_with_scores() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        let path = dir.join("manifest.json");
        Manifest::parse(&text, &path).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["files"].as_object_mut().unwrap().remove("decoder_weights");
        let err = Manifest::parse(&value.to_string(), &path).unwrap_err().to_string();
        assert!(
            err.contains("files.decoder_fast") && err.contains("come together"),
            "{err}"
        );
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["graphs"]["decoder"]["outputs"]
            .as_array_mut()
            .unwrap()
            .retain(|o| !o["name"].as_str().unwrap().starts_with("attn_colsum_"));
        let err = Manifest::parse(&value.to_string(), &path).unwrap_err().to_string();
        assert!(err.contains("outputs attention sums"), "{err}");
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["files"]["decoder_weights"] = "../weights".into();
        let err = Manifest::parse(&value.to_string(), &path).unwrap_err().to_string();
        assert!(
            err.contains("files.decoder_weights") && err.contains("outside"),
            "{err}"
        );
    }

    /// Multimodal RoPE and dynamic resolution are checked before anything
    /// is sized from them: sections that overflow or do not fill the head,
    /// a decoder whose `position_ids` has one row, a dynamic spec beside a
    /// fixed resize. Each is one error naming the field.
    #[test]
    fn multimodal_rope_and_dynamic_resolution_fields_are_checked() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        let path = dir.join("manifest.json");
        let parse = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
            edit(&mut value);
            Manifest::parse(&value.to_string(), &path).unwrap_err().to_string()
        };
        let err = parse(&|v| v["mrope_section"] = serde_json::json!([u64::MAX, 1, 0]));
        assert!(
            err.contains("mrope_section") && err.contains("head_dim / 2 = 8"),
            "{err}"
        );
        // Sections that fill the head, but the tiny decoder takes one row of positions.
        let err = parse(&|v| v["mrope_section"] = serde_json::json!([2, 3, 3]));
        assert!(err.contains("position_ids") && err.contains("[3, ?]"), "{err}");
        let err = parse(&|v| {
            v["vision"]["dynamic"] = serde_json::json!({"patch_size": 14, "merge_size": 2,
                "temporal_patch_size": 2, "window_size": 112, "min_pixels": 3136, "max_pixels": 37632})
        });
        assert!(
            err.contains("vision.dynamic needs resize bicubic_smart_resize"),
            "{err}"
        );
    }

    fn tiny(dir: &str) -> (PathBuf, Manifest) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let manifest = Manifest::load(&dir).unwrap();
        (dir, manifest)
    }

    #[test]
    fn onnxruntime_minor_versions_are_read_from_1_x_strings_only() {
        assert_eq!(onnxruntime_minor("1.31.1"), Some(31));
        assert_eq!(onnxruntime_minor("1.17.0"), Some(17));
        assert_eq!(onnxruntime_minor("2.0.0"), None);
        assert_eq!(onnxruntime_minor("garbage"), None);
    }

    #[test]
    fn a_format_2_decoder_on_an_older_onnxruntime_is_refused_naming_the_minimum() {
        let (dir, manifest) = tiny("models/tiny");
        assert_eq!(manifest.decoder_format(), DecoderFormat::InPlace);
        assert!(manifest.decoder_scores());
        let err = check_decoder_support(&dir, &manifest, "1.22.0", Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs ONNX Runtime 1.23 or newer"), "{err}");
        assert!(err.contains("the loaded one is 1.22.0"), "{err}");
        assert!(err.contains("--decoder-format 1"), "{err}");
        assert!(!err.contains('\n'));
        check_decoder_support(&dir, &manifest, "1.23.0", Device::Cpu).unwrap();
        // The same weights in format 1 run on JetPack 6's older runtimes.
        let (dir, manifest) = tiny("models/tiny-format1");
        assert_eq!(manifest.decoder_format(), DecoderFormat::PastAndNew);
        check_decoder_support(&dir, &manifest, "1.20.0", Device::Cpu).unwrap();
        let err = check_decoder_support(&dir, &manifest, "1.17.1", Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs ONNX Runtime 1.20 or newer"), "{err}");
    }

    #[test]
    fn a_gpu_refuses_what_its_group_query_attention_cannot_do() {
        let (dir, manifest) = tiny("models/tiny");
        for device in [Device::Cuda, Device::Tensorrt] {
            let err = check_decoder_support(&dir, &manifest, "1.31.1", device)
                .unwrap_err()
                .to_string();
            assert!(err.contains("takes float16 only"), "{err}");
        }
        // fp16 with scores and no fast graph: the probabilities output is
        // CPU-only.
        let mut fp16 = manifest.clone();
        fp16.dtype = "float16".into();
        let mut single = fp16.clone();
        single.files.decoder_fast = None;
        single.files.decoder_weights = None;
        let err = check_decoder_support(&dir, &single, "1.31.1", Device::Cuda)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no fast graph"), "{err}");
        // With its fast graph, that graph runs alone on the GPU (1.22 is
        // enough for it), both on the CPU.
        check_decoder_support(&dir, &fp16, "1.22.0", Device::Cuda).unwrap();
        let gpu = decoder_graphs(&fp16, Device::Cuda, false);
        assert_eq!(
            gpu,
            DecoderGraphs {
                main: false,
                fast: true
            }
        );
        // On the CPU fp16 runs one graph (a second would double its fp32
        // copies of the weights); fp32 both, unless asked for one.
        let cpu = decoder_graphs(&fp16, Device::Cpu, false);
        assert_eq!(
            cpu,
            DecoderGraphs {
                main: true,
                fast: false
            }
        );
        let cpu = decoder_graphs(&manifest, Device::Cpu, false);
        assert_eq!(cpu, DecoderGraphs { main: true, fast: true });
        assert!(!decoder_graphs(&manifest, Device::Cpu, true).fast);
        // fp16 without scores is what the GPU runs.
        single
            .graphs
            .decoder
            .outputs
            .retain(|o| !o.name.starts_with("attn_colsum_"));
        check_decoder_support(&dir, &single, "1.31.1", Device::Cuda).unwrap();
        // Format 1 goes to the provider as it is.
        let (dir, manifest) = tiny("models/tiny-format1");
        check_decoder_support(&dir, &manifest, "1.31.1", Device::Cuda).unwrap();
    }
}
