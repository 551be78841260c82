//! Reading the columns of a trajectory file (`trajectory_sink`) in tests.

use std::fs;
use std::path::{Path, PathBuf};

use nodes::trajectory_sink::arrow::array::{Array, FixedSizeListArray, Float32Array};
use nodes::trajectory_sink::arrow::record_batch::RecordBatch;

/// The tiny pipeline `tests/pipelines/<name>.yaml` (steps `sde@*`, rewards `score`, advantages
/// `advantages`) with a `trajectory_sink` storing `tensors` (none | f32 | f16), written into
/// `dir`.
pub fn with_sink(dir: &Path, name: &str, tensors: &str) -> PathBuf {
    let base =
        fs::read_to_string(super::root().join(format!("tests/pipelines/{name}.yaml"))).unwrap();
    let yaml = format!(
        "{base}  - id: sink\n    type: trajectory_sink\n    params: {{tensors: {tensors}}}\n    inputs:\n      transitions: sde@*.transition\n      rewards: score.rewards\n      advantages: advantages.advantages\n      prompts: prompts.prompts\n"
    );
    let p = dir.join(format!("{name}-sink.yaml"));
    fs::write(&p, yaml).unwrap();
    p
}

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
