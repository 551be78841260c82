//! Writing safetensors files as a stream: the header is computed from the tensors' names and
//! shapes first ([`Entry`]), then each tensor is copied from its device and written in chunks
//! ([`TensorWriter`]). Besides the tensors themselves, a write holds tens of MB, never a whole
//! tensor nor the file: a checkpoint of a multi-GB model (weights, EMA, AdamW moments) is
//! written without a second copy of it in memory. [`save_atomic`] writes one file crash-safely.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, anyhow, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData, bf16, f16};

use super::Layout;
use crate::model::checkpoint::param_paths;

/// Elements converted and written per chunk.
const CHUNK: usize = 1 << 16;

/// Elements of a tensor copied to the host at a time (16 MB of f32).
pub const READ_CHUNK: usize = 1 << 22;

/// The stored dtype of written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDtype {
    /// float32: the model's values exactly.
    #[default]
    F32,
    /// float16 (finite values beyond ±65504 are an error, not infinities).
    F16,
    /// bfloat16 (what SD3.5's published weights use).
    BF16,
}

impl StoreDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::F16 | StoreDtype::BF16 => 2,
        }
    }

    /// The safetensors dtype name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::F16 => "F16",
            StoreDtype::BF16 => "BF16",
        }
    }

    /// The short name (`f32`, `f16`, `bf16`), as `--dtype` spells it.
    pub fn name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "f32",
            StoreDtype::F16 => "f16",
            StoreDtype::BF16 => "bf16",
        }
    }
}

impl fmt::Display for StoreDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StoreDtype {
    type Err = anyhow::Error;

    /// `f32` / `float32` / `fp32`, `f16` / `float16` / `fp16`, `bf16` / `bfloat16`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(StoreDtype::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(StoreDtype::F16),
            "bf16" | "bfloat16" => Ok(StoreDtype::BF16),
            _ => bail!("unknown dtype {s:?} (expected f32, f16 or bf16)"),
        }
    }
}

/// One tensor of a file: its name and stored shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn new(name: impl Into<String>, shape: Vec<usize>) -> Self {
        Self {
            name: name.into(),
            shape,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The entries of `module`'s float parameters, in the order [`TensorWriter::write_module`]
/// writes them: `prefix + path`, shapes in `layout`.
pub fn module_entries<M: Module>(module: &M, prefix: &str, layout: Layout) -> Vec<Entry> {
    module_entries_where(module, prefix, layout, &|_| true)
}

/// [`module_entries`] of the parameters whose path `keep` accepts (the order of
/// [`TensorWriter::write_module_where`]).
pub fn module_entries_where<M: Module>(
    module: &M,
    prefix: &str,
    layout: Layout,
    keep: &dyn Fn(&str) -> bool,
) -> Vec<Entry> {
    param_paths(module)
        .into_iter()
        .filter(|(path, _, _)| keep(path))
        .map(|(path, _, mut shape)| {
            if layout == Layout::Torch && shape.len() == 2 {
                shape.reverse();
            }
            Entry::new(format!("{prefix}{path}"), shape)
        })
        .collect()
}

/// A safetensors header for `entries` in this order: the 8-byte length, then the JSON
/// (`metadata` first, keys sorted; the tensors with consecutive offsets), padded with spaces to
/// a multiple of 8 bytes as the safetensors library pads it.
pub fn header(
    entries: &[&Entry],
    dtype: StoreDtype,
    metadata: &HashMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    let mut json = String::from("{");
    if !metadata.is_empty() {
        let sorted: std::collections::BTreeMap<_, _> = metadata.iter().collect();
        json.push_str(r#""__metadata__":"#);
        json.push_str(&serde_json::to_string(&sorted)?);
    }
    let mut offset = 0u64;
    for e in entries {
        let end = offset + (e.numel() * dtype.size()) as u64;
        if json.len() > 1 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(&e.name)?);
        json.push_str(&format!(
            r#":{{"dtype":"{}","shape":{},"data_offsets":[{offset},{end}]}}"#,
            dtype.safetensors_name(),
            serde_json::to_string(&e.shape)?,
        ));
        offset = end;
    }
    json.push('}');
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    Ok(out)
}

/// Writes the tensors of one safetensors file, in the order of its entries, after its header.
pub struct TensorWriter<W: Write> {
    w: W,
    dtype: StoreDtype,
    entries: Vec<Entry>,
    next: usize,
    buf: Vec<u8>,
    read_chunk: usize,
    check_finite: bool,
}

impl<W: Write> TensorWriter<W> {
    /// Writes the header of `entries` to `w`.
    pub fn new(
        mut w: W,
        entries: Vec<Entry>,
        dtype: StoreDtype,
        metadata: &HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let refs: Vec<&Entry> = entries.iter().collect();
        w.write_all(&header(&refs, dtype, metadata)?)?;
        Ok(Self {
            w,
            dtype,
            entries,
            next: 0,
            buf: Vec::with_capacity(CHUNK * 4),
            read_chunk: READ_CHUNK,
            check_finite: false,
        })
    }

    /// Refuse non-finite values (an export must compute what the model computes; a checkpoint
    /// stores whatever the model holds).
    pub fn check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }

    /// Values copied to the host at a time (tests use small ones).
    pub fn read_chunk(mut self, n: usize) -> Self {
        self.read_chunk = n.max(1);
        self
    }

    /// Writes the next entry, `name`, from `tensor` (burn's shape; `layout` says how a 2-D
    /// tensor is stored).
    pub fn write<const D: usize>(
        &mut self,
        name: &str,
        tensor: Tensor<D>,
        layout: Layout,
    ) -> anyhow::Result<()> {
        let i = self.next;
        let entry = self
            .entries
            .get(i)
            .ok_or_else(|| anyhow!("internal: tensor {name} was not planned"))?;
        if entry.name != name {
            bail!("internal: tensor {i} is {name}, planned as {}", entry.name);
        }
        self.next += 1;
        let dims = tensor.dims();
        let n = tensor.shape().num_elements();
        if n != entry.numel() {
            bail!(
                "internal: tensor {name} has shape {dims:?}, planned as {:?}",
                entry.shape
            );
        }
        let (dtype, chunk, check) = (self.dtype, self.read_chunk, self.check_finite);
        let (w, buf) = (&mut self.w, &mut self.buf);
        let mut put = |part: TensorData| -> anyhow::Result<()> {
            let part = part.convert::<f32>();
            let values = part
                .as_slice::<f32>()
                .map_err(|e| anyhow!("internal: {e:?}"))?;
            write_values(w, values, dtype, check, buf)
        };
        let result = if D == 2 && layout == Layout::Torch {
            // burn [in, out] → PyTorch [out, in]: a block of PyTorch rows at a time, each the
            // transpose of a column block (a view; only the block is copied to the host).
            let [rows, cols] = [dims[0], dims[1]];
            let t: Tensor<2> = tensor.reshape([rows, cols]);
            let step = (chunk / rows.max(1)).max(1);
            (0..cols).step_by(step).try_for_each(|a| {
                let b = (a + step).min(cols);
                put(t.clone().slice_dim(1, a..b).transpose().into_data())
            })
        } else {
            let t: Tensor<1> = tensor.reshape([n]);
            (0..n).step_by(chunk).try_for_each(|a| {
                let b = (a + chunk).min(n);
                put(t.clone().slice_dim(0, a..b).into_data())
            })
        };
        result.map_err(|e| anyhow!("tensor {name}: {e:#}"))
    }

    /// Writes every float parameter of `module` (the next entries, as [`module_entries`]
    /// planned them).
    pub fn write_module<M: Module>(
        &mut self,
        module: &M,
        prefix: &str,
        layout: Layout,
    ) -> anyhow::Result<()> {
        self.write_module_where(module, prefix, layout, &|_| true)
    }

    /// [`write_module`](Self::write_module) of the parameters whose path `keep` accepts (as
    /// [`module_entries_where`] planned them).
    pub fn write_module_where<M: Module>(
        &mut self,
        module: &M,
        prefix: &str,
        layout: Layout,
        keep: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        struct Visit<'a, 'k, W: Write> {
            writer: &'a mut TensorWriter<W>,
            prefix: &'a str,
            keep: &'k dyn Fn(&str) -> bool,
            layout: Layout,
            path: Vec<String>,
            error: Option<anyhow::Error>,
        }
        impl<W: Write> ModuleVisitor for Visit<'_, '_, W> {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let path = self.path.join(".");
                if self.error.is_none() && (self.keep)(&path) {
                    let name = format!("{}{path}", self.prefix);
                    let r = self.writer.write(&name, param.val().detach(), self.layout);
                    self.error = r.err();
                }
            }
        }
        let mut v = Visit {
            writer: self,
            prefix,
            keep,
            layout,
            path: Vec::new(),
            error: None,
        };
        module.visit(&mut v);
        v.error.map_or(Ok(()), Err)
    }

    /// Whether every entry has been written.
    pub fn is_complete(&self) -> bool {
        self.next == self.entries.len()
    }

    /// Checks that every entry was written and flushes; returns the writer.
    pub fn finish(mut self) -> anyhow::Result<W> {
        if !self.is_complete() {
            bail!(
                "internal: wrote {} of {} tensors",
                self.next,
                self.entries.len()
            );
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Writes the safetensors file `path` crash-safely (temporary, fsync, rename): the header of
/// `entries`, then `fill` writes every tensor.
pub fn save_atomic(
    path: &Path,
    entries: Vec<Entry>,
    dtype: StoreDtype,
    metadata: &HashMap<String, String>,
    fill: impl FnOnce(&mut TensorWriter<BufWriter<&mut File>>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    runner::fsutil::write_atomic_with(path, |f| {
        let mut w = TensorWriter::new(
            BufWriter::with_capacity(1 << 20, f),
            entries,
            dtype,
            metadata,
        )?;
        fill(&mut w)?;
        w.finish()?
            .into_inner()
            .map_err(|e| anyhow!("{}", e.error()))?;
        Ok(())
    })
    .with_context(|| format!("saving {}", path.display()))
}

/// Converts `values` to `dtype` (little-endian) and writes them, `CHUNK` at a time. With
/// `check_finite`, non-finite values, and finite ones that f16 cannot hold, are an error.
fn write_values(
    w: &mut impl Write,
    values: &[f32],
    dtype: StoreDtype,
    check_finite: bool,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let size = dtype.size();
    for chunk in values.chunks(CHUNK) {
        if check_finite && !chunk.iter().fold(true, |ok, v| ok & v.is_finite()) {
            let v = chunk
                .iter()
                .find(|v| !v.is_finite())
                .expect("one is not finite");
            bail!("holds a non-finite value ({v}); the model is broken, refusing to export it");
        }
        buf.resize(chunk.len() * size, 0);
        match dtype {
            StoreDtype::F32 => {
                for (d, v) in buf.chunks_exact_mut(4).zip(chunk) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
            StoreDtype::F16 => {
                let mut overflow = false;
                for (d, &v) in buf.chunks_exact_mut(2).zip(chunk) {
                    let h = f16::from_f32(v);
                    overflow |= h.is_infinite() && v.is_finite();
                    d.copy_from_slice(&h.to_bits().to_le_bytes());
                }
                if overflow && check_finite {
                    let v = chunk
                        .iter()
                        .find(|&&v| f16::from_f32(v).is_infinite())
                        .expect("one overflows");
                    bail!("holds {v}, beyond float16's range (±65504); export as bf16 or f32");
                }
            }
            StoreDtype::BF16 => {
                for (d, &v) in buf.chunks_exact_mut(2).zip(chunk) {
                    d.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
                }
            }
        }
        w.write_all(buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::SafetensorsFile;
    use burn::tensor::Device;
    use safetensors::SafeTensors;

    fn tensors() -> (Tensor<2>, Tensor<1>) {
        let dev = Device::flex();
        let a: Vec<f32> = (0..12).map(|v| v as f32).collect();
        (
            Tensor::<2>::from_data(TensorData::new(a, [3, 4]), &dev),
            Tensor::<1>::from_data(TensorData::new(vec![0.5f32, -1.0], [2]), &dev),
        )
    }

    #[test]
    fn should_stream_tensors_in_chunks_of_any_size() {
        let (a, b) = tensors();
        for read_chunk in [1, 2, 3, 5, 100] {
            let entries = vec![Entry::new("a", vec![4, 3]), Entry::new("b", vec![2])];
            let mut w = TensorWriter::new(Vec::new(), entries, StoreDtype::F32, &HashMap::new())
                .unwrap()
                .read_chunk(read_chunk);
            w.write("a", a.clone(), Layout::Torch).unwrap();
            assert!(!w.is_complete());
            w.write("b", b.clone(), Layout::Burn).unwrap();
            let bytes = w.finish().unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let got = |n: &str| super::super::to_f32(&st.tensor(n).unwrap()).unwrap();
            // Transposed: row j of the file is column j of `a`.
            assert_eq!(
                got("a"),
                [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.],
                "read chunk {read_chunk}"
            );
            assert_eq!(st.tensor("a").unwrap().shape(), [4, 3]);
            assert_eq!(got("b"), [0.5, -1.0]);
        }
    }

    #[test]
    fn should_refuse_tensors_out_of_plan_or_missing() {
        let (a, b) = tensors();
        let entries = vec![Entry::new("a", vec![3, 4]), Entry::new("b", vec![2])];
        let mut w = TensorWriter::new(
            Vec::new(),
            entries.clone(),
            StoreDtype::F32,
            &HashMap::new(),
        )
        .unwrap();
        assert!(w.write("b", b.clone(), Layout::Burn).is_err());
        let mut w =
            TensorWriter::new(Vec::new(), entries, StoreDtype::F32, &HashMap::new()).unwrap();
        w.write("a", a, Layout::Burn).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("wrote 1 of 2"));
    }

    #[test]
    fn should_save_atomically_with_metadata() {
        let (a, b) = tensors();
        let dir = std::env::temp_dir().join(format!("flowrun-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        let entries = vec![Entry::new("a", vec![3, 4]), Entry::new("b", vec![2])];
        save_atomic(&path, entries.clone(), StoreDtype::BF16, &meta, |w| {
            w.write("a", a.clone(), Layout::Burn)?;
            w.write("b", b.clone(), Layout::Burn)
        })
        .unwrap();
        let f = SafetensorsFile::read(&path).unwrap();
        assert_eq!(f.meta("k").unwrap(), "v");
        assert_eq!(
            f.get("a").unwrap().1,
            (0..12).map(|v| v as f32).collect::<Vec<_>>()
        );
        assert_eq!(f.get("b").unwrap().1, [0.5, -1.0]);
        // A failed write leaves the file as it was, and no temporary.
        let e = save_atomic(&path, entries, StoreDtype::F32, &meta, |w| {
            w.write("a", a.clone(), Layout::Burn)
        });
        assert!(e.is_err());
        assert_eq!(
            SafetensorsFile::read(&path).unwrap().get("b").unwrap().1,
            [0.5, -1.0]
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
