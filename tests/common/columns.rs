//! Reading the columns of a trajectory file (`trajectory_sink`) in tests.

use nodes::trajectory_sink::arrow::array::{Array, FixedSizeListArray, Float32Array};
use nodes::trajectory_sink::arrow::record_batch::RecordBatch;

/// Column `name` of `b`, as its arrow array type.
pub fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap()
}

/// Row j of a float32 tensor column (`x_t`, `x_next`), as bits.
pub fn state(b: &RecordBatch, name: &str, j: usize) -> Vec<u32> {
    let l = col::<FixedSizeListArray>(b, name);
    let v = l.value(j);
    let f = v.as_any().downcast_ref::<Float32Array>().unwrap();
    f.values().iter().map(|x| x.to_bits()).collect()
}
