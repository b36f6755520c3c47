//! ONNX Runtime, loaded at run time (`ort` with `load-dynamic`).
//!
//! The library is looked for, in order: a path given on the command line,
//! `ORT_DYLIB_PATH`, next to the executable, in a checkout's
//! `.cache/onnxruntime/lib/` above the executable (where `scripts/setup.sh`
//! puts it), then the system's library search path (`LD_LIBRARY_PATH`,
//! ldconfig: where JetPack's ONNX Runtime lives). A path the user named is
//! never skipped: if it fails, that failure is the error.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{error_chain, Error, Result};

/// The oldest ONNX Runtime this build accepts (the crate's `api-20` floor).
pub const MIN_ORT_MINOR: u32 = 20;

/// The ONNX Runtime this process loaded.
pub struct OrtLibrary {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// How it was found.
    pub found_by: &'static str,
    /// The library's version, e.g. `1.31.1`.
    pub version: String,
    /// ONNX Runtime's build information (commit, build type).
    pub build_info: String,
    /// The process-wide environment; sessions attach to it.
    environment: ort::environment::Environment,
}

impl OrtLibrary {
    pub fn environment(&self) -> &ort::environment::Environment {
        &self.environment
    }
}

impl std::fmt::Debug for OrtLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtLibrary")
            .field("path", &self.path)
            .field("found_by", &self.found_by)
            .field("version", &self.version)
            .field("build_info", &self.build_info)
            .finish()
    }
}

static LOADED: OnceLock<OrtLibrary> = OnceLock::new();

/// Loads ONNX Runtime once per process; later calls return the first result.
pub fn load(explicit: Option<&Path>) -> Result<&'static OrtLibrary> {
    if let Some(loaded) = LOADED.get() {
        return Ok(loaded);
    }
    let library = locate_and_load(explicit)?;
    Ok(LOADED.get_or_init(|| library))
}

/// The loaded library, if `load` succeeded.
pub fn loaded() -> Option<&'static OrtLibrary> {
    LOADED.get()
}

fn locate_and_load(explicit: Option<&Path>) -> Result<OrtLibrary> {
    if let Some(path) = explicit {
        return load_from(path, "--onnxruntime");
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return load_from(Path::new(&path), "ORT_DYLIB_PATH");
    }
    let mut tried = Vec::new();
    for (path, found_by) in installed_candidates() {
        if path.exists() {
            return load_from(&path, found_by);
        }
        tried.push(path.display().to_string());
    }
    // Bare names: the dynamic loader searches LD_LIBRARY_PATH and ldconfig.
    let mut last_reason = None;
    for name in ["libonnxruntime.so.1", "libonnxruntime.so"] {
        match load_from(Path::new(name), "the system library path") {
            Ok(library) => return Ok(library),
            Err(err) => last_reason = Some(err.to_string()),
        }
        tried.push(format!("{name} on the system library path"));
    }
    log::debug!("last system-path failure: {last_reason:?}");
    Err(Error::RuntimeMissing {
        tried: tried.join(", "),
    })
}

/// Files an installed or developer setup places: beside the executable, and
/// in `.cache/onnxruntime/lib` of a checkout the executable was built in.
fn installed_candidates() -> Vec<(PathBuf, &'static str)> {
    let Ok(exe) = std::env::current_exe() else {
        return Vec::new();
    };
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push((dir.join("libonnxruntime.so"), "the executable's folder"));
        candidates.push((dir.join("libonnxruntime.so.1"), "the executable's folder"));
    }
    // target/release/elastic-edge and target/debug/deps/test-binary both sit
    // at most three folders below the checkout.
    for dir in exe.ancestors().skip(2).take(3) {
        candidates.push((
            dir.join(".cache/onnxruntime/lib/libonnxruntime.so"),
            "the checkout's .cache (scripts/setup.sh)",
        ));
    }
    candidates
}

fn load_from(path: &Path, found_by: &'static str) -> Result<OrtLibrary> {
    let hint = "Run scripts/setup.sh to fetch ONNX Runtime, or point ORT_DYLIB_PATH at a libonnxruntime.so of version 1.20 or newer";
    if path.components().count() > 1 && !path.exists() {
        return Err(Error::RuntimeLoad {
            path: path.to_path_buf(),
            found_by,
            reason: "no such file".into(),
            hint,
        });
    }
    if path.components().count() > 1 {
        // dlopen of a FIFO blocks, of a device never ends.
        if let Err(err) = crate::regular_file::check(path) {
            return Err(Error::RuntimeLoad {
                path: path.to_path_buf(),
                found_by,
                reason: err.to_string(),
                hint,
            });
        }
    }
    match ort::init_from(path) {
        Ok(builder) => {
            let environment = builder
                .with_name("elastic-edge")
                .build()
                .map_err(|err| Error::Runtime {
                    context: format!("creating the environment from {}", path.display()),
                    reason: error_chain(&err),
                })?;
            Ok(OrtLibrary {
                path: path.to_path_buf(),
                found_by,
                version: version_of(path).unwrap_or_else(|| "unknown".into()),
                build_info: ort::info().to_string(),
                environment,
            })
        }
        Err(err) => Err(Error::RuntimeLoad {
            path: path.to_path_buf(),
            found_by,
            reason: match &err {
                // `ort` prints "dlopen failed"; the reason (a missing
                // libcublas.so.13, a wrong ELF class) is in libloading's
                // source chain.
                ort::LoadDynamicError::Dlopen { error, .. } => error_chain(error),
                other => other.to_string(),
            },
            hint,
        }),
    }
}

/// Asks the library at `path` (already loaded, so this only takes another
/// reference) for its version string.
fn version_of(path: &Path) -> Option<String> {
    // SAFETY: the library was loaded successfully by `ort` from this path
    // and exports `OrtGetApiBase`, which returns a static table whose
    // `GetVersionString` returns a static NUL-terminated string.
    unsafe {
        let library = libloading::Library::new(path).ok()?;
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            library.get(b"OrtGetApiBase").ok()?;
        let base = get_base();
        if base.is_null() {
            return None;
        }
        let version = ((*base).GetVersionString)();
        if version.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(version).to_string_lossy().into_owned())
    }
}

/// The execution providers the loaded library was built with
/// (`CPUExecutionProvider`, `CUDAExecutionProvider`, ...).
pub fn available_providers() -> Result<Vec<String>> {
    let api = ort::api();
    let mut names: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut count: std::ffi::c_int = 0;
    // SAFETY: both out-pointers are valid; on success ONNX Runtime fills an
    // array of `count` NUL-terminated strings that we release below.
    let status = unsafe { (api.GetAvailableProviders)(&mut names, &mut count) };
    if !status.0.is_null() {
        // SAFETY: a non-null status is ours to release.
        unsafe { (api.ReleaseStatus)(status.0) };
        return Err(Error::Runtime {
            context: "listing execution providers".into(),
            reason: "GetAvailableProviders failed".into(),
        });
    }
    if names.is_null() {
        return Ok(Vec::new());
    }
    let mut providers = Vec::with_capacity(count.max(0) as usize);
    for i in 0..count.max(0) as usize {
        // SAFETY: `names` holds `count` valid string pointers.
        let name = unsafe { std::ffi::CStr::from_ptr(*names.add(i)) };
        providers.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: releases exactly what GetAvailableProviders returned.
    let status = unsafe { (api.ReleaseAvailableProviders)(names, count) };
    if !status.0.is_null() {
        // SAFETY: as above.
        unsafe { (api.ReleaseStatus)(status.0) };
    }
    Ok(providers)
}
