//! A shared weights file's trailer and index through
//! `model::weights::read_index`.
//!
//! Contract: an error is one line, never a panic; an accepted tensor lies
//! inside the file before the index, starts at a multiple of 64, and its
//! bytes are its shape's elements times its type's size.
#![no_main]

use elastic_edge::model::weights::read_index;
use elastic_edge_fuzz::assert_one_line;
use libfuzzer_sys::fuzz_target;

fn element_size(dtype: &str) -> u64 {
    match dtype {
        "float32" | "int32" => 4,
        "float16" => 2,
        "uint8" | "int8" => 1,
        "int64" => 8,
        other => panic!("accepted the unknown dtype {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    match read_index(data) {
        Ok(tensors) => {
            let len = data.len() as u64;
            let index_bytes = u64::from_le_bytes(data[data.len() - 16..data.len() - 8].try_into().unwrap());
            let data_end = len - 16 - index_bytes;
            for t in tensors {
                assert_eq!(t.offset % 64, 0, "{t:?}");
                assert!(t.offset + t.bytes <= data_end, "{t:?} past {data_end}");
                let elements: u64 = t.shape.iter().product();
                assert_eq!(elements * element_size(&t.dtype), t.bytes, "{t:?}");
            }
        }
        Err(e) => assert_one_line(&e),
    }
});
