//! NVIDIA CUDA. Compiled in with the `cuda` feature; the loaded ONNX Runtime
//! must be a CUDA build too (JetPack's, or PyPI's `onnxruntime-gpu`).

use ort::ep::ExecutionProviderDispatch;

use super::ProviderOptions;
#[cfg(not(feature = "cuda"))]
use crate::error::Error;
use crate::error::Result;

#[cfg(feature = "cuda")]
pub fn dispatch(options: &ProviderOptions) -> Result<ExecutionProviderDispatch> {
    Ok(ort::ep::CUDA::default()
        .with_device_id(options.device_id)
        .build()
        .error_on_failure())
}

#[cfg(not(feature = "cuda"))]
pub fn dispatch(_options: &ProviderOptions) -> Result<ExecutionProviderDispatch> {
    Err(Error::Runtime {
        context: "registering the CUDA execution provider".into(),
        reason: "this binary was built without CUDA support; rebuild with `cargo build --release --features cuda`"
            .into(),
    })
}
