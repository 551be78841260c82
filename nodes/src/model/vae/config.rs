//! [`VaeConfig`]: the decoder's configuration, read from diffusers' `vae/config.json`
//! (`AutoencoderKL`). Field names and defaults are diffusers' own.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::config::Config;
use serde_json::{Map, Value, json};

/// Up-block types the decoder implements.
pub const SUPPORTED_UP_BLOCKS: &[&str] = &["UpDecoderBlock2D"];
/// Activations the decoder implements (`swish` is diffusers' other name for SiLU).
pub const SUPPORTED_ACTIVATIONS: &[&str] = &["silu", "swish"];

/// Fields of an `AutoencoderKL` config that only the encoder uses: accepted and ignored.
const ENCODER_FIELDS: &[&str] = &["in_channels", "down_block_types"];
/// Fields that must be null: per-channel latent statistics are not what SD3 decodes with.
const NULL_FIELDS: &[&str] = &["latents_mean", "latents_std"];
/// Decoder fields, read into [`VaeConfig`].
const DECODER_FIELDS: &[&str] = &[
    "latent_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "up_block_types",
    "act_fn",
    "scaling_factor",
    "shift_factor",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
    "sample_size",
    "force_upcast",
];

/// Configuration of [`super::VaeDecoder`]: diffusers' `AutoencoderKL` config, decoder side.
/// Defaults are `AutoencoderKL.__init__`'s (a `config.json` may leave fields out).
#[derive(Config, Debug, PartialEq)]
pub struct VaeConfig {
    /// Channels of the latents (SD3: 16).
    #[config(default = 4)]
    pub latent_channels: usize,
    /// Channels of the decoded image (3: RGB).
    #[config(default = 3)]
    pub out_channels: usize,
    /// Channels per resolution level, highest resolution first (the decoder runs them
    /// reversed). SD3: [128, 256, 512, 512].
    #[config(default = "vec![64]")]
    pub block_out_channels: Vec<usize>,
    /// Residual blocks per encoder level; each decoder up block has one more.
    #[config(default = 1)]
    pub layers_per_block: usize,
    /// GroupNorm groups of every norm (must divide every entry of `block_out_channels`).
    #[config(default = 32)]
    pub norm_num_groups: usize,
    /// One per level, lowest resolution first; see [`SUPPORTED_UP_BLOCKS`].
    #[config(default = "vec![String::from(\"UpDecoderBlock2D\")]")]
    pub up_block_types: Vec<String>,
    /// See [`SUPPORTED_ACTIVATIONS`].
    #[config(default = "String::from(\"silu\")")]
    pub act_fn: String,
    /// Latents are `z · scaling_factor` (SD3: 1.5305); decoding divides by it first.
    #[config(default = 0.18215)]
    pub scaling_factor: f64,
    /// Latents are `(z − shift_factor) · scaling_factor` (SD3: 0.0609); `None` = 0.
    pub shift_factor: Option<f64>,
    /// Encoder side only (the 1×1 conv after the encoder); recorded, unused.
    #[config(default = true)]
    pub use_quant_conv: bool,
    /// A 1×1 conv on the latents before the decoder (`post_quant_conv.*`).
    #[config(default = true)]
    pub use_post_quant_conv: bool,
    /// Self-attention in the mid block.
    #[config(default = true)]
    pub mid_block_add_attention: bool,
    /// Image size the VAE was trained at (the first entry when diffusers has a list);
    /// informational.
    #[config(default = 32)]
    pub sample_size: usize,
    /// diffusers runs such VAEs in float32; we always do. Recorded, unused.
    #[config(default = true)]
    pub force_upcast: bool,
}

impl VaeConfig {
    /// Reads and validates `config.json` of a diffusers VAE folder; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read VAE config {}", path.display()))?;
        Self::from_diffusers_json(&text).with_context(|| format!("VAE config {}", path.display()))
    }

    /// Parses and validates diffusers' `AutoencoderKL` config JSON. Keys starting with `_`
    /// are diffusers' metadata (`_class_name` must then be `AutoencoderKL`); encoder-only
    /// fields are accepted and ignored; any other field not listed here is an error naming it.
    pub fn from_diffusers_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("not valid JSON")?;
        let Value::Object(m) = v else {
            bail!("expected a JSON object, found {}", kind(&v));
        };
        let mut unknown: Vec<&str> = m
            .keys()
            .map(String::as_str)
            .filter(|k| {
                !k.starts_with('_')
                    && !DECODER_FIELDS.contains(k)
                    && !ENCODER_FIELDS.contains(k)
                    && !NULL_FIELDS.contains(k)
            })
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            let list: Vec<String> = unknown.iter().map(|k| format!("`{k}`")).collect();
            bail!(
                "unknown field{} {} (an AutoencoderKL config has: {})",
                if unknown.len() > 1 { "s" } else { "" },
                list.join(", "),
                [DECODER_FIELDS, ENCODER_FIELDS, NULL_FIELDS]
                    .concat()
                    .join(", ")
            );
        }
        if let Some(c) = m.get("_class_name")
            && c.as_str() != Some("AutoencoderKL")
        {
            bail!("`_class_name` is {c}: only diffusers' AutoencoderKL is supported");
        }
        for k in NULL_FIELDS {
            if m.get(*k).is_some_and(|v| !v.is_null()) {
                bail!(
                    "`{k}` is set: per-channel latent statistics are not supported (the decoder \
                     applies SD3's z / scaling_factor + shift_factor)"
                );
            }
        }
        let d = Self::new();
        let config = VaeConfig {
            latent_channels: usize_field(&m, "latent_channels", d.latent_channels)?,
            out_channels: usize_field(&m, "out_channels", d.out_channels)?,
            block_out_channels: usize_list(&m, "block_out_channels", d.block_out_channels)?,
            layers_per_block: usize_field(&m, "layers_per_block", d.layers_per_block)?,
            norm_num_groups: usize_field(&m, "norm_num_groups", d.norm_num_groups)?,
            up_block_types: str_list(&m, "up_block_types", d.up_block_types)?,
            act_fn: match m.get("act_fn") {
                None => d.act_fn,
                Some(Value::String(s)) => s.clone(),
                Some(v) => bail!("`act_fn` must be a string, found {}", kind(v)),
            },
            scaling_factor: f64_field(&m, "scaling_factor")?.unwrap_or(d.scaling_factor),
            shift_factor: f64_field(&m, "shift_factor")?,
            use_quant_conv: bool_field(&m, "use_quant_conv", d.use_quant_conv)?,
            use_post_quant_conv: bool_field(&m, "use_post_quant_conv", d.use_post_quant_conv)?,
            mid_block_add_attention: bool_field(
                &m,
                "mid_block_add_attention",
                d.mid_block_add_attention,
            )?,
            sample_size: match m.get("sample_size") {
                Some(Value::Array(a)) if !a.is_empty() => as_usize(&a[0], "sample_size")?,
                Some(v) => as_usize(v, "sample_size")?,
                None => d.sample_size,
            },
            force_upcast: bool_field(&m, "force_upcast", d.force_upcast)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// The config as diffusers writes it (`config.json` of a VAE folder). Encoder fields are
    /// filled in for the mirrored encoder diffusers would build.
    pub fn to_diffusers_json(&self) -> Value {
        json!({
            "_class_name": "AutoencoderKL",
            "act_fn": self.act_fn,
            "block_out_channels": self.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; self.block_out_channels.len()],
            "force_upcast": self.force_upcast,
            "in_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "latents_mean": null,
            "latents_std": null,
            "layers_per_block": self.layers_per_block,
            "mid_block_add_attention": self.mid_block_add_attention,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "up_block_types": self.up_block_types,
            "use_post_quant_conv": self.use_post_quant_conv,
            "use_quant_conv": self.use_quant_conv,
        })
    }

    /// Checks what the decoder can build; `init` panics with this message otherwise.
    pub fn validate(&self) -> Result<()> {
        let ch = &self.block_out_channels;
        if ch.is_empty() || ch.contains(&0) {
            bail!(
                "`block_out_channels` must be a non-empty list of positive integers, found {ch:?}"
            );
        }
        if self.latent_channels == 0 || self.out_channels == 0 {
            bail!("`latent_channels` and `out_channels` must be positive");
        }
        if self.up_block_types.len() != ch.len() {
            bail!(
                "`up_block_types` has {} entries but `block_out_channels` has {}: one up block per level",
                self.up_block_types.len(),
                ch.len()
            );
        }
        for t in &self.up_block_types {
            if !SUPPORTED_UP_BLOCKS.contains(&t.as_str()) {
                bail!(
                    "unsupported up block type `{t}` in `up_block_types` (supported: {})",
                    SUPPORTED_UP_BLOCKS.join(", ")
                );
            }
        }
        if !SUPPORTED_ACTIVATIONS.contains(&self.act_fn.as_str()) {
            bail!(
                "unsupported activation `act_fn: {}` (supported: {})",
                self.act_fn,
                SUPPORTED_ACTIVATIONS.join(", ")
            );
        }
        let g = self.norm_num_groups;
        if g == 0 || ch.iter().any(|c| c % g != 0) {
            bail!("`norm_num_groups` {g} must divide every entry of `block_out_channels` {ch:?}");
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            bail!(
                "`scaling_factor` must be a finite non-zero number, found {}",
                self.scaling_factor
            );
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            bail!("`shift_factor` must be finite or null");
        }
        Ok(())
    }

    /// The decoder's upscaling factor, `2^(levels − 1)` (SD3: 8).
    pub fn upscale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// `shift_factor`, 0 when null.
    pub fn shift(&self) -> f64 {
        self.shift_factor.unwrap_or(0.0)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn as_usize(v: &Value, key: &str) -> Result<usize> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .with_context(|| format!("`{key}` must be a non-negative integer, found {v}"))
}

fn usize_field(m: &Map<String, Value>, key: &str, default: usize) -> Result<usize> {
    m.get(key).map_or(Ok(default), |v| as_usize(v, key))
}

fn usize_list(m: &Map<String, Value>, key: &str, default: Vec<usize>) -> Result<Vec<usize>> {
    match m.get(key) {
        None => Ok(default),
        Some(Value::Array(a)) => a.iter().map(|v| as_usize(v, key)).collect(),
        Some(v) => bail!("`{key}` must be a list of integers, found {}", kind(v)),
    }
}

fn str_list(m: &Map<String, Value>, key: &str, default: Vec<String>) -> Result<Vec<String>> {
    match m.get(key) {
        None => Ok(default),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("`{key}` must be a list of strings, found {v}"))
            })
            .collect(),
        Some(v) => bail!("`{key}` must be a list of strings, found {}", kind(v)),
    }
}

/// A number, or `None` when absent or null.
fn f64_field(m: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("`{key}` must be a number, found {v}")),
    }
}

fn bool_field(m: &Map<String, Value>, key: &str, default: bool) -> Result<bool> {
    match m.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => bail!("`{key}` must be true or false, found {v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD3's `vae/config.json` (stabilityai/stable-diffusion-3-medium-diffusers).
    const SD3: &str = r#"{
      "_class_name": "AutoencoderKL",
      "_diffusers_version": "0.29.0.dev0",
      "act_fn": "silu",
      "block_out_channels": [128, 256, 512, 512],
      "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
      "force_upcast": true,
      "in_channels": 3,
      "latent_channels": 16,
      "latents_mean": null,
      "latents_std": null,
      "layers_per_block": 2,
      "norm_num_groups": 32,
      "out_channels": 3,
      "sample_size": 1024,
      "scaling_factor": 1.5305,
      "shift_factor": 0.0609,
      "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
      "use_post_quant_conv": false,
      "use_quant_conv": false
    }"#;

    fn with(key: &str, value: Value) -> String {
        let mut v: Value = serde_json::from_str(SD3).unwrap();
        v[key] = value;
        v.to_string()
    }

    fn err(text: &str) -> String {
        format!("{:#}", VaeConfig::from_diffusers_json(text).unwrap_err())
    }

    #[test]
    fn should_read_sd3s_vae_config() {
        let c = VaeConfig::from_diffusers_json(SD3).unwrap();
        assert_eq!(c.latent_channels, 16);
        assert_eq!(c.block_out_channels, vec![128, 256, 512, 512]);
        assert_eq!((c.layers_per_block, c.norm_num_groups), (2, 32));
        assert_eq!((c.scaling_factor, c.shift_factor), (1.5305, Some(0.0609)));
        assert!(!c.use_post_quant_conv && !c.use_quant_conv && c.mid_block_add_attention);
        assert_eq!((c.upscale(), c.sample_size), (8, 1024));
        // Round trip through what `save_vae` writes.
        let again = VaeConfig::from_diffusers_json(&c.to_diffusers_json().to_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn should_apply_diffusers_defaults_and_a_null_shift() {
        let c = VaeConfig::from_diffusers_json(r#"{"shift_factor": null}"#).unwrap();
        assert_eq!(c, VaeConfig::new());
        assert_eq!(
            (c.shift(), c.latent_channels, c.norm_num_groups),
            (0.0, 4, 32)
        );
        let c = VaeConfig::from_diffusers_json(&with("sample_size", json!([512, 768]))).unwrap();
        assert_eq!(c.sample_size, 512);
        assert_eq!(
            VaeConfig::from_diffusers_json(&with("act_fn", json!("swish")))
                .unwrap()
                .act_fn,
            "swish"
        );
    }

    #[test]
    fn should_name_unknown_fields() {
        let e = err(&with("decoder_depth", json!(3)));
        assert!(e.contains("unknown field `decoder_depth`"), "{e}");
        let mut v: Value = serde_json::from_str(SD3).unwrap();
        v["zz"] = json!(1);
        v["aa"] = json!(1);
        let e = err(&v.to_string());
        assert!(e.contains("unknown fields `aa`, `zz`"), "{e}");
    }

    #[test]
    fn should_name_what_is_supported_for_an_unsupported_block_or_activation() {
        let e = err(&with(
            "up_block_types",
            json!([
                "UpDecoderBlock2D",
                "AttnUpDecoderBlock2D",
                "UpDecoderBlock2D",
                "UpDecoderBlock2D"
            ]),
        ));
        assert!(
            e.contains("unsupported up block type `AttnUpDecoderBlock2D`")
                && e.contains("supported: UpDecoderBlock2D"),
            "{e}"
        );
        let e = err(&with("act_fn", json!("gelu")));
        assert!(
            e.contains("unsupported activation `act_fn: gelu`") && e.contains("silu, swish"),
            "{e}"
        );
    }

    #[test]
    fn should_refuse_inconsistent_or_mistyped_configs() {
        for (key, value, says) in [
            ("norm_num_groups", json!(24), "must divide every entry"),
            (
                "up_block_types",
                json!(["UpDecoderBlock2D"]),
                "one up block per level",
            ),
            ("block_out_channels", json!([]), "non-empty list"),
            ("scaling_factor", json!(0.0), "finite non-zero"),
            (
                "layers_per_block",
                json!(-1),
                "`layers_per_block` must be a non-negative integer",
            ),
            (
                "use_post_quant_conv",
                json!("no"),
                "`use_post_quant_conv` must be true or false",
            ),
            (
                "latents_mean",
                json!(vec![0.0; 16]),
                "`latents_mean` is set",
            ),
            (
                "_class_name",
                json!("AutoencoderTiny"),
                "only diffusers' AutoencoderKL",
            ),
        ] {
            let e = err(&with(key, value));
            assert!(e.contains(says), "{key}: {e}");
        }
        assert!(err("[1, 2]").contains("expected a JSON object"));
        assert!(err("{").contains("not valid JSON"));
    }
}
