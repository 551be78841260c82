//! LoRA: low-rank adapters on a model's linear layers, the base weights frozen.
//!
//! * [`LoraConfig`] is the `flow_model` resource's `lora:` mapping: `rank`, `alpha`, `targets`
//!   (module-path patterns), `init`, `rslora`, `weights` (an adapter file to start from).
//! * Every architecture lists its linear layers through [`Linears`] (paths as the parameter
//!   paths, which for SD3 are diffusers' module names); [`attach`] freezes every base parameter
//!   and gives each matching layer a fresh adapter, [`detach`] gives the base back (the KL
//!   reference of a LoRA policy: the same tensors, no copy), [`merge`] folds the adapters into
//!   the weights (`W + s·A·B`, for sampling files and diffusers export).
//! * [`file`] reads and writes adapters as diffusers' `pytorch_lora_weights.safetensors` (peft's
//!   key names, `lora_adapter_metadata` with rank and alpha), so that `load_lora_weights` of
//!   diffusers loads flowrun's adapters and flowrun loads peft's.
//!
//! * [`BaseDtype`] and [`cast_base`]: the frozen base in bf16/f16 (the `flow_model`'s
//!   `base_dtype`), the adapters, their AdamW moments and the loss in f32; [`Linear`] computes
//!   the adapter's term in f32 and adds it in the activations' dtype, as peft does.
//!
//! Pattern semantics are peft's `target_modules` list: a layer matches a pattern when its path
//! equals it or ends with `.` + pattern; a `*` in a pattern matches any characters within one
//! path segment (`transformer_blocks.*.attn.to_q`).

pub mod file;
mod linear;

pub use linear::{Factor, Linear};

use anyhow::{Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{FloatDType, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::standard_normal;

/// How a fresh adapter's down-projection `A` is drawn; `B` is always zero, so that the adapted
/// model starts as the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// `A ~ N(0, 1/r²)`: peft's `init_lora_weights="gaussian"`, what Flow-GRPO uses.
    #[default]
    Gaussian,
    /// `A ~ U(−1/√d_in, 1/√d_in)`: peft's default (Kaiming-uniform with a = √5).
    Kaiming,
}

impl LoraInit {
    /// peft's `init_lora_weights` value.
    pub fn peft(self) -> serde_json::Value {
        match self {
            Self::Gaussian => serde_json::json!("gaussian"),
            Self::Kaiming => serde_json::json!(true),
        }
    }
}

/// The `lora:` settings of a `flow_model` (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// r: the adapters' rank (0 with `weights`, which sets it).
    #[serde(default)]
    pub rank: usize,
    /// α; the low-rank term is scaled by α / r (α / √r with `rslora`). Default: r (scale 1).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Module-path patterns of the adapted layers; empty = the architecture's defaults.
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub init: LoraInit,
    /// LoRA dropout on the adapters' input. Only 0: GRPO's importance ratio needs the update's
    /// forward to be the rollout's (dropout in one and not the other biases the ratio).
    #[serde(default)]
    pub dropout: f64,
    /// rsLoRA: scale α / √r instead of α / r.
    #[serde(default)]
    pub rslora: bool,
    /// Start from this adapter (diffusers' `pytorch_lora_weights.safetensors`, peft's
    /// `adapter_model.safetensors`, or a folder holding one): its layers, ranks and α.
    #[serde(default)]
    pub weights: Option<std::path::PathBuf>,
}

impl LoraConfig {
    pub fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha: Some(alpha),
            targets: Vec::new(),
            init: LoraInit::Gaussian,
            dropout: 0.0,
            rslora: false,
            weights: None,
        }
    }

    pub fn with_targets(mut self, targets: &[&str]) -> Self {
        self.targets = targets.iter().map(|t| t.to_string()).collect();
        self
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// s = α / r, or α / √r with rsLoRA.
    pub fn scale(&self) -> f64 {
        let r = self.rank as f64;
        if self.rslora {
            self.alpha() / r.sqrt()
        } else {
            self.alpha() / r
        }
    }

    /// Every problem of the settings (field names as the YAML spells them).
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.weights.is_some() {
            if self.rank != 0 || self.alpha.is_some() || !self.targets.is_empty() {
                problems.push(
                    "set either `weights` (an adapter file: rank, alpha and layers come from \
                     it) or `rank`/`alpha`/`targets` (fresh adapters), not both"
                        .to_string(),
                );
            }
        } else if self.rank == 0 {
            problems.push("`rank` must be at least 1 (or `weights`: an adapter file)".to_string());
        }
        if let Some(a) = self.alpha
            && !(a.is_finite() && a > 0.0)
        {
            problems.push(format!("`alpha` must be a positive number, got {a}"));
        }
        if self.dropout != 0.0 {
            problems.push(format!(
                "`dropout` {} is not supported: only 0 (GRPO's importance ratio compares the \
                 update's forward with the rollout's, and dropout in the update alone would \
                 bias it; Flow-GRPO trains its LoRA without dropout)",
                self.dropout
            ));
        }
        for t in &self.targets {
            if t.is_empty() || t.split('.').any(|s| s.is_empty()) {
                problems.push(format!(
                    "target {t:?} is not a module path (dot-separated names, e.g. attn.to_q)"
                ));
            }
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(())
    }

    /// The targets, or `defaults` when none are given.
    pub fn targets_or<'a>(&'a self, defaults: &'a [&'a str]) -> Vec<&'a str> {
        if self.targets.is_empty() {
            defaults.to_vec()
        } else {
            self.targets.iter().map(|s| s.as_str()).collect()
        }
    }

    /// From the `lora` parameter's JSON (`null` = no LoRA).
    pub fn from_json(v: &serde_json::Value) -> Result<Option<Self>> {
        if v.is_null() {
            return Ok(None);
        }
        let cfg: Self = serde_json::from_value(v.clone()).map_err(|e| {
            anyhow::anyhow!(
                "{e} (expected {{rank: 32, alpha: 64, targets: [attn.to_q, …], init: \
                 gaussian|kaiming, rslora: false}})"
            )
        })?;
        cfg.validate()?;
        Ok(Some(cfg))
    }
}

/// The dtype a LoRA policy keeps its frozen base weights in (`flow_model`'s `base_dtype`).
/// Adapters, AdamW moments, the loss, log-probs and ratios are f32 whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDtype {
    /// Every weight f32 (the default, bit-for-bit the behaviour without the setting).
    #[default]
    F32,
    BF16,
    F16,
}

impl BaseDtype {
    /// The names `base_dtype` accepts.
    pub const NAMES: [&'static str; 3] = ["f32", "bf16", "f16"];

    pub fn float_dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::BF16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 | Self::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::BF16 => "bf16",
            Self::F16 => "f16",
        }
    }

    pub fn is_half(self) -> bool {
        self != Self::F32
    }
}

impl std::str::FromStr for BaseDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::BF16),
            "f16" => Ok(Self::F16),
            _ => bail!("unknown base dtype `{s}` (one of f32, bf16, f16)"),
        }
    }
}

/// Every float parameter of `model` but the LoRA adapters' (`lora_A`, `lora_B`): a LoRA
/// policy's frozen base, cast to `dtype`. Adapters keep theirs (f32); a parameter already of
/// `dtype` is kept as it is (`F32` widens a half base back). (Parameters are told apart by path, not by `require_grad`, which a model on a
/// plain device does not report.)
pub fn cast_base<M: Module>(model: M, dtype: BaseDtype) -> M {
    struct Cast {
        dtype: FloatDType,
        path: Vec<String>,
    }
    impl burn::module::ModuleMapper for Cast {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if self.path.iter().any(|p| p == "lora_A" || p == "lora_B") {
                return param;
            }
            let dtype = self.dtype;
            param.map(|t| t.cast(dtype))
        }
    }
    model.map(&mut Cast {
        dtype: dtype.float_dtype(),
        path: Vec::new(),
    })
}

/// The linear layers of a module, each with its path (the prefix of its parameters' paths).
pub trait Linears {
    /// Calls `f` with every linear layer below this module and its path (`path` is this
    /// module's own, `""` at the root).
    fn each_linear(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Linear));
}

/// `path.name`, or `name` at the root.
pub fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

impl Linears for Linear {
    fn each_linear(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        f(path, self)
    }
}

impl<T: Linears> Linears for Option<T> {
    fn each_linear(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        if let Some(t) = self {
            t.each_linear(path, f)
        }
    }
}

impl<T: Linears> Linears for Vec<T> {
    fn each_linear(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (i, t) in self.iter_mut().enumerate() {
            t.each_linear(&join(path, &i.to_string()), f)
        }
    }
}

/// `impl Linears` for a struct: the listed fields, each at `path.field`.
#[macro_export]
macro_rules! impl_linears {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::model::lora::Linears for $ty {
            fn each_linear(
                &mut self,
                path: &str,
                f: &mut dyn FnMut(&str, &mut $crate::model::lora::Linear),
            ) {
                $(
                    $crate::model::lora::Linears::each_linear(
                        &mut self.$field,
                        &$crate::model::lora::join(path, stringify!($field)),
                        f,
                    );
                )*
            }
        }
    };
}

/// Whether the layer at `path` matches `pattern` (peft's suffix rule, `*` within a segment).
pub fn matches(path: &str, pattern: &str) -> bool {
    let p: Vec<&str> = path.split('.').collect();
    let q: Vec<&str> = pattern.split('.').collect();
    if q.len() > p.len() {
        return false;
    }
    p[p.len() - q.len()..]
        .iter()
        .zip(&q)
        .all(|(s, pat)| glob(s, pat))
}

/// `*` matches any run of characters (within one segment).
fn glob(s: &str, pat: &str) -> bool {
    match pat.split_once('*') {
        None => s == pat,
        Some((head, rest)) => {
            let Some(s) = s.strip_prefix(head) else {
                return false;
            };
            (0..=s.len()).any(|i| s.is_char_boundary(i) && glob(&s[i..], rest))
        }
    }
}

/// FNV-1a of a path: each adapter's init stream is independent of traversal order.
fn hash_path(path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The paths of every linear layer of `model`.
pub fn linear_paths<M: Linears>(model: &mut M) -> Vec<String> {
    let mut out = Vec::new();
    model.each_linear("", &mut |p, _| out.push(p.to_string()));
    out
}

/// Freezes every parameter of `model` and attaches a fresh adapter (seeded by `seed` and the
/// layer's path) to each linear layer matching one of the targets (`defaults` when the config
/// names none). Returns the model and the adapted layers' paths. An error names the given
/// targets that match no layer (with examples of the model's layer names; of the defaults, only
/// none matching at all is an error: a one-block SD3 has no `attn.to_add_out`) and layers
/// already adapted.
pub fn attach<M: Module + Linears>(
    model: M,
    cfg: &LoraConfig,
    defaults: &[&str],
    seed: u64,
) -> Result<(M, Vec<String>)> {
    cfg.validate()?;
    let targets = cfg.targets_or(defaults);
    let mut model = model.no_grad();
    let mut hit = vec![false; targets.len()];
    let mut adapted = Vec::new();
    let mut twice = Vec::new();
    let scale = cfg.scale();
    let r = cfg.rank;
    model.each_linear("", &mut |path, lin| {
        let mut any = false;
        for (i, t) in targets.iter().enumerate() {
            if matches(path, t) {
                hit[i] = true;
                any = true;
            }
        }
        if !any {
            return;
        }
        if lin.is_adapted() {
            twice.push(path.to_string());
            return;
        }
        let [d_in, d_out] = lin.dims();
        let device = lin.weight.lazy_device();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ hash_path(path));
        let a: Vec<f32> = match cfg.init {
            LoraInit::Gaussian => (0..d_in * r)
                .map(|_| (standard_normal(&mut rng) / r as f64) as f32)
                .collect(),
            LoraInit::Kaiming => {
                let bound = 1.0 / (d_in as f64).sqrt();
                (0..d_in * r)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
        };
        let factor = |values: Vec<f32>, shape: [usize; 2]| Factor {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), &device)),
        };
        lin.lora_A = Some(factor(a, [d_in, r]));
        lin.lora_B = Some(factor(vec![0.0; r * d_out], [r, d_out]));
        lin.lora_scale = scale;
        adapted.push(path.to_string());
    });
    if !twice.is_empty() {
        bail!(
            "layer(s) already hold an adapter: {} (attach LoRA once)",
            twice.join(", ")
        );
    }
    let unmatched: Vec<&str> = targets
        .iter()
        .zip(&hit)
        .filter(|(_, h)| !**h)
        .map(|(t, _)| *t)
        .collect();
    let strict = !cfg.targets.is_empty();
    if !unmatched.is_empty() && (strict || adapted.is_empty()) {
        bail!(
            "{}",
            unmatched_message(&unmatched, &linear_paths(&mut model))
        );
    }
    Ok((model, adapted))
}

/// The patterns of `targets` that match none of the layer paths `names`.
pub fn unmatched<'a>(targets: &[&'a str], names: &[String]) -> Vec<&'a str> {
    targets
        .iter()
        .filter(|t| !names.iter().any(|n| matches(n, t)))
        .copied()
        .collect()
}

/// Why the patterns `unmatched` adapt nothing, with examples of the model's layer `names`.
pub fn unmatched_message(unmatched: &[&str], names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
    format!(
        "LoRA target(s) {} match no linear layer of the model (its {} linear layers are named \
         like {}, …; a pattern matches a path's last segments, `*` within a segment)",
        unmatched
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", "),
        names.len(),
        shown.join(", ")
    )
}

/// The model without its adapters: the frozen base (the same tensors, no copy).
pub fn detach<M: Linears>(mut model: M) -> M {
    model.each_linear("", &mut |_, lin| {
        lin.lora_A = None;
        lin.lora_B = None;
    });
    model
}

/// The adapters folded into the weights, `W + s·A·B`, and removed. The sum is formed in f32
/// (a half-precision base is widened first): merged layers hold f32 weights, for the sampling
/// files and the diffusers export.
pub fn merge<M: Linears>(mut model: M) -> M {
    model.each_linear("", &mut |_, lin| {
        if let Some(delta) = lin.delta() {
            let id = lin.weight.id;
            let w = lin.weight.val().detach().cast(FloatDType::F32) + delta.detach();
            lin.weight = Param::initialized(id, w);
            lin.lora_A = None;
            lin.lora_B = None;
        }
    });
    model
}

/// Whether any linear layer of `model` holds an adapter.
pub fn is_adapted<M: Linears>(model: &mut M) -> bool {
    let mut any = false;
    model.each_linear("", &mut |_, lin| any |= lin.is_adapted());
    any
}

/// Every adapted layer: (path, rank, scale), in the model's order.
pub fn adapted_layers<M: Linears>(model: &mut M) -> Vec<(String, usize, f64)> {
    let mut out = Vec::new();
    model.each_linear("", &mut |p, lin| {
        if lin.is_adapted() {
            out.push((p.to_string(), lin.rank(), lin.lora_scale));
        }
    });
    out
}

/// The paths of `module`'s parameters that are trained (require a gradient).
pub fn trainable_paths<M: Module>(module: &M) -> Vec<String> {
    struct V {
        path: Vec<String>,
        out: Vec<String>,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.out.push(self.path.join("."));
            }
        }
    }
    let mut v = V {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

#[cfg(test)]
mod tests;
