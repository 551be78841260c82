//! Filling a burn module from safetensors: [`load_module`] walks the module's parameters, takes
//! each from a [`TensorSource`] by its path, converts it to f32 (and to burn's layout), and
//! collects every problem into [`Problems`], which the caller turns into one error.

use std::collections::HashSet;
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::TensorView;

use super::file::{READ_DTYPES, SafetensorsFile, to_f32, transpose};

/// Where tensors come from: one file, or the shards of a model folder.
pub trait TensorSource {
    /// What errors name (the file, or the index of sharded weights).
    fn shown(&self) -> &Path;
    /// The tensor `name`, and the shard's file name when there are several files.
    fn view(&self, name: &str) -> Option<(TensorView<'_>, Option<String>)>;
    /// Every tensor name.
    fn names(&self) -> Vec<&str>;
    /// Problems of the source itself (e.g. shards that disagree with their index).
    fn problems(&self) -> Problems {
        Problems::default()
    }
}

impl TensorSource for SafetensorsFile {
    fn shown(&self) -> &Path {
        &self.path
    }

    fn view(&self, name: &str) -> Option<(TensorView<'_>, Option<String>)> {
        SafetensorsFile::view(self, name).map(|v| (v, None))
    }

    fn names(&self) -> Vec<&str> {
        SafetensorsFile::names(self).collect()
    }
}

/// How a file lays out 2-D parameters (the only 2-D parameters are `Linear` weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// burn's `[d_in, d_out]`: flowrun's own checkpoints.
    Burn,
    /// PyTorch's `[d_out, d_in]`: diffusers' and peft's files (transposed on the way).
    Torch,
}

/// Section titles of [`Problems`] that the loaders share.
pub const MISSING: &str = "missing key(s) (in the model, not in the files)";
pub const UNKNOWN: &str = "unknown key(s) (in the files, not in the model)";
pub const MISSHAPED: &str = "mis-shaped key(s)";
/// Names shown per section.
const SHOWN: usize = 10;

/// Problems found while loading, by kind; [`Problems::into_result`] reports them all at once.
#[derive(Debug, Clone, Default)]
pub struct Problems {
    sections: Vec<(String, Vec<String>)>,
}

impl Problems {
    /// Adds `item` to the section `what`.
    pub fn push(&mut self, what: &str, item: String) {
        match self.sections.iter_mut().find(|(w, _)| w == what) {
            Some((_, items)) => items.push(item),
            None => self.sections.push((what.to_string(), vec![item])),
        }
    }

    pub fn extend(&mut self, other: Problems) {
        for (what, items) in other.sections {
            for item in items {
                self.push(&what, item);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// `Ok` when there is no problem, else one error: `context`, then a line per kind of
    /// problem (`N what: a, b, … (k more)`; unknown names sorted, others in the model's order),
    /// at most ten names a line.
    pub fn into_result(self, context: impl FnOnce() -> String) -> anyhow::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        // Missing, unknown, mis-shaped first, in that order; other kinds as they came.
        let rank = |w: &str| [MISSING, UNKNOWN, MISSHAPED].iter().position(|k| *k == w);
        let mut sections = self.sections;
        sections.sort_by_key(|(w, _)| rank(w).unwrap_or(usize::MAX));
        let lines: Vec<String> = sections
            .into_iter()
            .map(|(what, mut items)| {
                // Unknown keys come from hash maps: sorted. Others keep the model's order.
                if what == UNKNOWN {
                    items.sort();
                }
                let n = items.len();
                let more = if n > SHOWN {
                    format!(", … ({} more)", n - SHOWN)
                } else {
                    String::new()
                };
                items.truncate(SHOWN);
                format!("{n} {what}: {}{more}", items.join(", "))
            })
            .collect();
        anyhow::bail!("{}:\n  {}", context(), lines.join("\n  "))
    }
}

/// What [`load_module`] reads.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions<'a> {
    /// Tensor names are `prefix + parameter path`.
    pub prefix: &'a str,
    pub layout: Layout,
    /// Parameters that may be absent from the source (they keep the module's value).
    pub optional: &'a [&'a str],
}

impl<'a> LoadOptions<'a> {
    pub fn new(layout: Layout) -> Self {
        Self {
            prefix: "",
            layout,
            optional: &[],
        }
    }

    pub fn prefix(self, prefix: &'a str) -> Self {
        Self { prefix, ..self }
    }

    pub fn optional(self, optional: &'a [&'a str]) -> Self {
        Self { optional, ..self }
    }
}

/// Every float parameter of `module` from `src` (see the module docs). Names taken are added
/// to `used`; problems (missing, mis-shaped, unreadable) to `problems`, and a parameter with a
/// problem keeps the module's value. Tensors are converted one at a time, so loading holds at
/// most one tensor on the host besides the memory-mapped files.
pub fn load_module<M: Module>(
    module: M,
    src: &impl TensorSource,
    opts: LoadOptions<'_>,
    used: &mut HashSet<String>,
    problems: &mut Problems,
) -> M {
    let mut loader = Loader {
        src,
        opts,
        path: Vec::new(),
        used,
        problems,
    };
    module.map(&mut loader)
}

/// Adds the names of `src` that are not in `used` (and start with none of `ignored`) to
/// `problems` as unknown keys.
pub fn unknown_keys(
    src: &impl TensorSource,
    used: &HashSet<String>,
    ignored: &[&str],
    problems: &mut Problems,
) {
    for name in src.names() {
        if !used.contains(name) && !ignored.iter().any(|p| name.starts_with(p)) {
            problems.push(UNKNOWN, name.to_string());
        }
    }
}

/// [`load_module`] of a whole file or folder: every parameter, no unknown key, the source's own
/// problems; one error (`context`, then every problem) otherwise.
pub fn load_all<M: Module>(
    module: M,
    src: &impl TensorSource,
    opts: LoadOptions<'_>,
    ignored: &[&str],
    context: impl FnOnce() -> String,
) -> anyhow::Result<M> {
    let mut used = HashSet::new();
    let mut problems = src.problems();
    let module = load_module(module, src, opts, &mut used, &mut problems);
    unknown_keys(src, &used, ignored, &mut problems);
    problems.into_result(context)?;
    Ok(module)
}

struct Loader<'a, S> {
    src: &'a S,
    opts: LoadOptions<'a>,
    path: Vec<String>,
    used: &'a mut HashSet<String>,
    problems: &'a mut Problems,
}

impl<S: TensorSource> ModuleMapper for Loader<'_, S> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let name = format!("{}{path}", self.opts.prefix);
        let shape: [usize; D] = param.lazy_shape().dims();
        let transposed = D == 2 && self.opts.layout == Layout::Torch;
        let mut file_shape = shape.to_vec();
        if transposed {
            file_shape.reverse();
        }
        let Some((view, shard)) = self.src.view(&name) else {
            if !self.opts.optional.contains(&path.as_str()) {
                self.problems.push(MISSING, name);
            }
            return param;
        };
        self.used.insert(name.clone());
        let in_shard = shard.map(|s| format!(" in {s}")).unwrap_or_default();
        if view.shape() != file_shape.as_slice() {
            self.problems.push(
                MISSHAPED,
                format!(
                    "{name}{in_shard} (file {:?}, model {file_shape:?})",
                    view.shape()
                ),
            );
            return param;
        }
        let mut values = match to_f32(&view) {
            Ok(v) => v,
            Err(_) => {
                self.problems.push(
                    &format!("key(s) of an unsupported dtype (supported: {READ_DTYPES})"),
                    format!("{name}{in_shard} ({:?})", view.dtype()),
                );
                return param;
            }
        };
        if transposed {
            values = transpose(&values, file_shape[0], file_shape[1]);
        }
        let device = param.lazy_device();
        // Weights live as long as the model: allocate them as such (the pool of short-lived
        // activations is not grown by a model's worth of tensors).
        let tensor = device.memory_persistent_allocations(TensorData::new(values, shape), |data| {
            Tensor::<D>::from_data(data, &device)
        });
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}
