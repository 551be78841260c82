//! [`SafetensorsFile`]: one memory-mapped, validated safetensors file, and the conversions every
//! loader shares ([`to_f32`], [`transpose`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use burn::tensor::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorView};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

/// A safetensors file, memory-mapped: the header is parsed and validated once (offsets, sizes)
/// when it is opened; tensor data is read from the map only when a tensor is asked for, so a
/// multi-GB checkpoint is never held in memory twice.
pub struct SafetensorsFile {
    pub path: PathBuf,
    map: Mmap,
    header: Metadata,
    /// Where tensor data starts (8 + the header's length).
    data_start: usize,
    /// The tensors' names, in the order of their data.
    names: Vec<String>,
    /// The header's `__metadata__` (string → string).
    pub metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    /// Opens and validates `path`. Errors name the file and say, in our words, what is wrong
    /// with it; nothing in a file can make this panic.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        let file = File::open(path).with_context(|| format!("cannot read {shown}"))?;
        // Only a regular file can be mapped and its length trusted (`/dev/zero` cannot).
        let meta = file
            .metadata()
            .with_context(|| format!("cannot read {shown}"))?;
        if !meta.is_file() {
            bail!("{shown} is not a safetensors file: it is not a regular file");
        }
        if meta.len() < 8 {
            bail!(
                "{shown} is not a safetensors file: {}",
                why(&SafeTensorError::HeaderTooSmall, &[], meta.len())
            );
        }
        // SAFETY: the map is read-only; as with every memory-mapped model loader, the file must
        // not be truncated or rewritten by another process while it is open. flowrun itself
        // never rewrites a file in place (every write is a temporary renamed over it).
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| anyhow!("{shown}: cannot memory-map: {e}"))?;
        let not_safetensors = |e: SafeTensorError| {
            anyhow!(
                "{shown} is not a safetensors file: {}",
                why(&e, &map, map.len() as u64)
            )
        };
        // Full validation (offsets, sizes, overlaps) happens here.
        SafeTensors::deserialize(&map).map_err(not_safetensors)?;
        let (header_len, header) = SafeTensors::read_metadata(&map).map_err(not_safetensors)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            names: header.offset_keys(),
            data_start: 8 + header_len,
            map,
            header,
            metadata,
        })
    }

    /// The names of every tensor, in the order of their data in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// How many tensors the file holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The whole file as `safetensors` reads it (its header parsed again).
    pub fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.map).expect("validated in read()")
    }

    /// The tensor `name`, or `None` when the file has none of that name.
    pub fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.header.info(name)?;
        let (a, b) = info.data_offsets;
        let data = self.map.get(self.data_start + a..self.data_start + b)?;
        // Validated in `read`: shape, dtype and the data's length agree.
        TensorView::new(info.dtype, info.shape.clone(), data).ok()
    }

    /// Metadata value `key`, or an error naming the file and the key.
    pub fn meta(&self, key: &str) -> anyhow::Result<&str> {
        self.metadata.get(key).map(String::as_str).ok_or_else(|| {
            anyhow!(
                "checkpoint {}: missing metadata key {key:?}",
                self.path.display()
            )
        })
    }

    /// Host copy of tensor `name` as f32, with its shape.
    pub fn get(&self, name: &str) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
        let view = self.view(name).ok_or_else(|| {
            anyhow!(
                "checkpoint {}: missing tensor {name:?}",
                self.path.display()
            )
        })?;
        let values = to_f32(&view)
            .map_err(|e| anyhow!("checkpoint {}: tensor {name:?}: {e}", self.path.display()))?;
        Ok((view.shape().to_vec(), values))
    }
}

/// Why `bytes` (of a file of `size` bytes) is not a valid safetensors file, in our words (a
/// safetensors file is an 8-byte little-endian header length, a JSON header of that length,
/// then the tensor data the header describes). Says nothing of the file's content beyond its
/// sizes.
fn why(e: &SafeTensorError, bytes: &[u8], size: u64) -> String {
    use SafeTensorError as E;
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or_default();
    match e {
        E::HeaderTooSmall => format!(
            "its header is truncated ({size} bytes, fewer than the 8 that give the header's length)"
        ),
        E::HeaderTooLarge => format!(
            "its header is too large (the first 8 bytes give a length of {header_len} bytes, \
             over the 100 MB a safetensors header may have)"
        ),
        E::InvalidHeaderLength => format!(
            "its header is truncated (the first 8 bytes give a length of {header_len} bytes; the \
             file has {size} bytes)"
        ),
        E::InvalidHeader(_) => "its header is not UTF-8 text".to_string(),
        E::InvalidHeaderDeserialization(_) | E::JsonError(_) => {
            "its header is not a safetensors JSON header".to_string()
        }
        E::MetadataIncompleteBuffer => format!(
            "its tensor data does not match its header (the header describes a different amount \
             of data than the file's {size} bytes hold: truncated, or extra bytes at the end)"
        ),
        E::InvalidOffset(name) => {
            format!("its header gives invalid data offsets for tensor `{name}`")
        }
        E::TensorInvalidInfo | E::ValidationOverflow | E::InvalidTensorView(..) => {
            "its header describes a tensor whose shape, type and data size disagree".to_string()
        }
        _ => "it cannot be read as one".to_string(),
    }
}

/// The dtypes [`to_f32`] reads, as errors name them.
pub const READ_DTYPES: &str = "F32, F16, BF16, F64";

/// A tensor's little-endian data as f32 (F32, F16, BF16 and F64 are read; F64 is rounded);
/// an error naming the dtype otherwise.
pub fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let data = view.data();
    let pairs = || {
        data.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => pairs().map(|b| f16::from_bits(b).to_f32()).collect(),
        Dtype::BF16 => pairs().map(|b| bf16::from_bits(b).to_f32()).collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()) as f32)
            .collect(),
        other => return Err(format!("dtype {other:?} (read: {READ_DTYPES})")),
    })
}

/// Row-major `[rows, cols]` → `[cols, rows]`, in cache-sized tiles.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut dst = vec![0.0f32; src.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_transpose_in_tiles() {
        let (r, c) = (37, 70);
        let src: Vec<f32> = (0..r * c).map(|v| v as f32).collect();
        let t = transpose(&src, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i], src[i * c + j]);
            }
        }
    }

    #[test]
    fn should_read_every_float_dtype() {
        let vals = [1.5f32, -2.25, 0.0];
        let cases: Vec<(Dtype, Vec<u8>)> = vec![
            (
                Dtype::F32,
                vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                Dtype::F16,
                vals.iter()
                    .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
                    .collect(),
            ),
            (
                Dtype::BF16,
                vals.iter()
                    .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
                    .collect(),
            ),
            (
                Dtype::F64,
                vals.iter()
                    .flat_map(|&v| (v as f64).to_le_bytes())
                    .collect(),
            ),
        ];
        for (dtype, bytes) in cases {
            let view = TensorView::new(dtype, vec![3], &bytes).unwrap();
            assert_eq!(to_f32(&view).unwrap(), vals, "{dtype:?}");
        }
        let ints = [0u8; 12];
        let view = TensorView::new(Dtype::I32, vec![3], &ints).unwrap();
        assert!(to_f32(&view).unwrap_err().contains("I32"));
    }
}
