//! Execution providers, one file each. A GPU provider that cannot register
//! is an error naming the reason, never a silent run on the CPU.

mod cpu;
mod cuda;
mod tensorrt;

use std::path::PathBuf;

use ort::ep::ExecutionProviderDispatch;

use crate::error::Result;

/// Where the graphs run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// ONNX Runtime's CPU kernels (everywhere).
    #[default]
    Cpu,
    /// NVIDIA CUDA (needs an ONNX Runtime built with CUDA).
    Cuda,
    /// NVIDIA TensorRT, falling back to CUDA for unsupported nodes.
    Tensorrt,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Tensorrt => "tensorrt",
        })
    }
}

/// How sessions are built.
#[derive(Clone, Debug, Default)]
pub struct ProviderOptions {
    pub device: Device,
    /// CUDA device ordinal.
    pub device_id: i32,
    /// TensorRT: where built engines are cached (building one takes minutes).
    pub tensorrt_cache: Option<PathBuf>,
    /// TensorRT: allow fp16 kernels.
    pub tensorrt_fp16: bool,
}

/// The providers to register, in priority order. The CPU provider is
/// always last: it runs whatever a GPU provider leaves.
pub fn dispatch(options: &ProviderOptions) -> Result<Vec<ExecutionProviderDispatch>> {
    let mut providers = Vec::new();
    match options.device {
        Device::Cpu => {}
        Device::Cuda => providers.push(cuda::dispatch(options)?),
        Device::Tensorrt => {
            providers.push(tensorrt::dispatch(options)?);
            providers.push(cuda::dispatch(options)?);
        }
    }
    providers.push(cpu::dispatch());
    Ok(providers)
}

/// Checks that the providers for `options` register with the loaded ONNX
/// Runtime, without a model: the error names what is missing (a provider
/// absent from the build, or a CUDA library that does not load).
pub fn check(environment: &ort::environment::Environment, options: &ProviderOptions) -> Result<()> {
    let providers = dispatch(options)?;
    let builder = ort::session::Session::builder(environment).map_err(|e| crate::error::Error::Runtime {
        context: "creating a session builder".into(),
        reason: crate::error::error_chain(&e),
    })?;
    builder
        .with_execution_providers(providers)
        .map(|_| ())
        .map_err(|e| crate::error::Error::Runtime {
            context: format!("registering the {} execution provider", options.device),
            reason: crate::error::error_chain(&e),
        })
}
