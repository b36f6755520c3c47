//! NVIDIA TensorRT, with an engine cache (building engines takes minutes on a
//! Jetson) and optional fp16. Compiled in with the `tensorrt` feature.

use ort::ep::ExecutionProviderDispatch;

use super::ProviderOptions;
use crate::error::{Error, Result};

#[cfg(feature = "tensorrt")]
pub fn dispatch(options: &ProviderOptions) -> Result<ExecutionProviderDispatch> {
    let mut provider = ort::ep::TensorRT::default()
        .with_device_id(options.device_id)
        .with_fp16(options.tensorrt_fp16);
    if let Some(cache) = &options.tensorrt_cache {
        std::fs::create_dir_all(cache).map_err(|e| Error::Runtime {
            context: format!("creating the TensorRT engine cache {}", cache.display()),
            reason: e.to_string(),
        })?;
        provider = provider.with_engine_cache(true).with_engine_cache_path(cache.display());
    }
    Ok(provider.build().error_on_failure())
}

#[cfg(not(feature = "tensorrt"))]
pub fn dispatch(_options: &ProviderOptions) -> Result<ExecutionProviderDispatch> {
    Err(Error::Runtime {
        context: "registering the TensorRT execution provider".into(),
        reason:
            "this binary was built without TensorRT support; rebuild with `cargo build --release --features tensorrt`"
                .into(),
    })
}
