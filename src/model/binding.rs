//! ONNX Runtime tensors over pool memory, so the decoder writes its new keys
//! and values straight into the pool's free slots.
//!
//! `ort` 2.0.0-rc.15 only lets a run write into *owned* values
//! (`OutputSelector::preallocate`), and its views over borrowed memory cannot
//! be made owned. So an owned value is built here from the raw C API over
//! the slots, and `PoolOutput` carries the borrow of those slots for as long
//! as the value lives. Inputs need none of this: borrowed views go through
//! `Session::run` without a copy.

use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use ort::memory::{Allocator, MemoryInfo};
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputs, SessionOutputs};
use ort::value::{DynValue, PrimitiveTensorElementType, Value};
use ort::AsPointer;

use crate::error::{Error, Result};

/// Run options whose preallocated outputs are pool slots. It borrows those
/// slots for `'a`, and the outputs of a run borrow it, so neither the values
/// over the slots nor the session outputs that share them can outlive the
/// borrow.
pub(crate) struct PoolRun<'a> {
    options: RunOptions<HasSelectedOutputs>,
    _slots: PhantomData<&'a mut [u8]>,
}

/// Collects the outputs to write in place; every other graph output is
/// fetched as usual.
pub(crate) struct PoolRunBuilder<'a> {
    selector: OutputSelector,
    allocator: &'a Allocator,
    _slots: PhantomData<&'a mut [u8]>,
}

impl<'a> PoolRunBuilder<'a> {
    pub(crate) fn new(allocator: &'a Allocator) -> Self {
        PoolRunBuilder {
            selector: OutputSelector::default(),
            allocator,
            _slots: PhantomData,
        }
    }

    /// The graph output `name` (of `shape`) is written into `slots`.
    pub(crate) fn write_into<E: PrimitiveTensorElementType>(
        self,
        name: &str,
        slots: &'a mut [E],
        shape: &[i64],
    ) -> Result<Self> {
        let elements: i64 = shape.iter().product();
        if elements < 0 || elements as usize != slots.len() {
            return Err(Error::Shape(format!(
                "output {name} of shape {shape:?} does not cover the {} slots given",
                slots.len()
            )));
        }
        let info = MemoryInfo::default();
        let api = ort::api();
        let mut raw: *mut ort::sys::OrtValue = ptr::null_mut();
        // SAFETY: `slots` is valid for reads and writes of its byte length for
        // 'a, which `PoolRun` borrows; the shape is valid for the call; ONNX
        // Runtime does not take ownership of external data.
        let status = unsafe {
            (api.CreateTensorWithDataAsOrtValue)(
                info.ptr(),
                slots.as_mut_ptr().cast(),
                std::mem::size_of_val(slots),
                shape.as_ptr(),
                shape.len(),
                E::into_tensor_element_type().into(),
                &mut raw,
            )
        };
        check(status)?;
        let raw = NonNull::new(raw).ok_or_else(|| Error::Runtime {
            context: format!("creating output {name} over the KV pool"),
            reason: "ONNX Runtime returned no value".into(),
        })?;
        // SAFETY: `raw` is a tensor value just created by ONNX Runtime and
        // owned by nobody else; releasing it does not free external data.
        let value: DynValue = unsafe { Value::from_ptr(raw, Some(self.allocator)) };
        Ok(PoolRunBuilder {
            selector: self.selector.preallocate(name, value),
            ..self
        })
    }

    pub(crate) fn build(self) -> Result<PoolRun<'a>> {
        let options = RunOptions::new().map_err(|e| Error::Runtime {
            context: "creating run options".into(),
            reason: e.to_string(),
        })?;
        Ok(PoolRun {
            options: options.with_outputs(self.selector),
            _slots: PhantomData,
        })
    }
}

impl PoolRun<'_> {
    /// Runs `session`; the preallocated outputs land in their slots, the
    /// others come back in the outputs as usual.
    pub(crate) fn run<'r, 'i, 'v: 'i>(
        &'r self,
        session: &'r mut Session,
        inputs: impl Into<SessionInputs<'i, 'v>>,
    ) -> ort::Result<SessionOutputs<'r>> {
        session.run_with_options(inputs, &self.options)
    }
}

fn check(status: ort::sys::OrtStatusPtr) -> Result<()> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from the C API holds a NUL-terminated message
    // and is ours to release.
    let message = unsafe {
        let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        text
    };
    Err(Error::Runtime {
        context: "creating an output tensor over the KV pool".into(),
        reason: message,
    })
}
