//! ONNX Runtime's CPU provider (arena allocator on).

use ort::ep::{ExecutionProviderDispatch, CPU};

pub fn dispatch() -> ExecutionProviderDispatch {
    CPU::default().with_arena_allocator(true).build()
}
