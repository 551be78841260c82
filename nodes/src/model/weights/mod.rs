//! Safetensors weights, read and written in one place for every model file flowrun touches:
//! its own checkpoints and trainer states, diffusers' SD3 transformers and VAEs, the diffusers
//! export.
//!
//! * Reading ([`SafetensorsFile`], [`FolderWeights`]): files are memory-mapped and validated
//!   once; tensors are converted to f32 one at a time (F32, F16, BF16, F64), PyTorch `Linear`
//!   weights transposed to burn's layout on the way ([`Layout`]). A multi-GB model is never
//!   held in memory twice.
//! * Loading a module ([`load_module`], [`load_all`]): every parameter by its path; every
//!   missing, unknown, mis-shaped or unreadable key is collected into one error ([`Problems`])
//!   naming the file.
//! * Writing ([`TensorWriter`], [`save_atomic`]): the header first, then each tensor streamed
//!   from its device in chunks; files are written crash-safely (temporary, fsync, rename).

mod file;
mod folder;
mod load;
mod write;

pub use file::{READ_DTYPES, SafetensorsFile, to_f32, transpose};
pub use folder::{FolderWeights, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, read_small_text};
pub use load::{
    Layout, LoadOptions, MISSHAPED, MISSING, Problems, TensorSource, UNKNOWN, load_all,
    load_module, unknown_keys,
};
pub use write::{
    Entry, READ_CHUNK, StoreDtype, TensorWriter, header, module_entries, module_entries_where,
    save_atomic,
};
