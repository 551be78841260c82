//! [`Sd3Config`]: diffusers' `SD3Transformer2DModel` configuration (`transformer/config.json`).
//!
//! Field names and defaults are diffusers' (0.42.1). A field this crate does not know is an
//! error naming it: a future diffusers field may change the maths, and must not be ignored.

use anyhow::{bail, ensure};
use serde::{Deserialize, Serialize};

/// The one diffusers class this module implements.
pub const SD3_CLASS_NAME: &str = "SD3Transformer2DModel";

/// Width of the sinusoidal timestep features (`Timesteps(num_channels=256)` in diffusers).
pub const TIME_PROJ_DIM: usize = 256;

/// The most transformer blocks a config may have (see [`Sd3Config::validate`]).
pub const MAX_LAYERS: usize = 1024;

fn d_sample_size() -> usize {
    128
}
fn d_patch_size() -> usize {
    2
}
fn d_in_channels() -> usize {
    16
}
fn d_num_layers() -> usize {
    18
}
fn d_attention_head_dim() -> usize {
    64
}
fn d_num_attention_heads() -> usize {
    18
}
fn d_joint_attention_dim() -> usize {
    4096
}
fn d_caption_projection_dim() -> usize {
    1152
}
fn d_pooled_projection_dim() -> usize {
    2048
}
fn d_out_channels() -> Option<usize> {
    Some(16)
}
fn d_pos_embed_max_size() -> Option<usize> {
    Some(96)
}

/// diffusers' `SD3Transformer2DModel` config (SD3 and SD3.5). Missing fields take diffusers'
/// defaults; `null` for `out_channels` means `in_channels`, `null` for `pos_embed_max_size`
/// means no crop (the sin-cos grid is computed for each latent size), `null` for `qk_norm`
/// means no query/key normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sd3Config {
    /// Latent side the model was trained at; sets the sin-cos grid's `base_size`
    /// (`sample_size / patch_size`).
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_patch_size")]
    pub patch_size: usize,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    #[serde(default = "d_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of the prompt embeddings (`encoder_hidden_states`).
    #[serde(default = "d_joint_attention_dim")]
    pub joint_attention_dim: usize,
    /// Width of the projected prompt embeddings; must equal the inner width
    /// (`num_attention_heads * attention_head_dim`), as in every diffusers SD3 model.
    #[serde(default = "d_caption_projection_dim")]
    pub caption_projection_dim: usize,
    /// Width of the pooled prompt embedding.
    #[serde(default = "d_pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default = "d_out_channels")]
    pub out_channels: Option<usize>,
    /// Side of the stored sin-cos grid (in patches), centre-cropped to the latent size.
    #[serde(default = "d_pos_embed_max_size")]
    pub pos_embed_max_size: Option<usize>,
    /// Blocks with the second (image-only) attention `attn2` and the 9-way modulation (SD3.5).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `"rms_norm"` (SD3.5) or `None`.
    #[serde(default)]
    pub qk_norm: Option<String>,
    /// diffusers' class name; must be [`SD3_CLASS_NAME`] when present.
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    /// Informational, no effect on the maths.
    #[serde(
        rename = "_diffusers_version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub diffusers_version: Option<String>,
    /// Informational, no effect on the maths.
    #[serde(
        rename = "_name_or_path",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub name_or_path: Option<String>,
}

impl Default for Sd3Config {
    /// diffusers' defaults (SD3-Medium-sized).
    fn default() -> Self {
        Self {
            sample_size: d_sample_size(),
            patch_size: d_patch_size(),
            in_channels: d_in_channels(),
            num_layers: d_num_layers(),
            attention_head_dim: d_attention_head_dim(),
            num_attention_heads: d_num_attention_heads(),
            joint_attention_dim: d_joint_attention_dim(),
            caption_projection_dim: d_caption_projection_dim(),
            pooled_projection_dim: d_pooled_projection_dim(),
            out_channels: d_out_channels(),
            pos_embed_max_size: d_pos_embed_max_size(),
            dual_attention_layers: Vec::new(),
            qk_norm: None,
            class_name: None,
            diffusers_version: None,
            name_or_path: None,
        }
    }
}

/// The query/key normalisation of the attention layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `attention_head_dim` channels, eps 1e-6, learned scale.
    RmsNorm,
}

impl Sd3Config {
    /// diffusers' unit-test sized model (`tests/models/transformers/test_models_transformer_sd3.py`):
    /// 4 blocks of width 32 (4 heads of 8), 4 latent channels, patch 1.
    pub fn tiny() -> Self {
        Self {
            sample_size: 32,
            patch_size: 1,
            in_channels: 4,
            num_layers: 4,
            attention_head_dim: 8,
            num_attention_heads: 4,
            joint_attention_dim: 32,
            caption_projection_dim: 32,
            pooled_projection_dim: 64,
            out_channels: Some(4),
            ..Self::default()
        }
    }

    /// Parses a diffusers `config.json` text: the class name is checked first (a Flux config
    /// says so rather than listing its unknown fields), then every field, then [`validate`].
    ///
    /// [`validate`]: Self::validate
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not a JSON config: {e}"))?;
        let Some(obj) = value.as_object() else {
            bail!("not a diffusers config: the JSON is not an object");
        };
        if let Some(class) = obj.get("_class_name") {
            match class.as_str() {
                Some(SD3_CLASS_NAME) => {}
                Some(other) => bail!(
                    "_class_name is {other:?}; only {SD3_CLASS_NAME:?} (Stable Diffusion 3 / 3.5) \
                     is supported"
                ),
                None => bail!("_class_name is not a string: {class}"),
            }
        }
        let config: Self = serde_json::from_value(value).map_err(|e| {
            // serde's message names an unknown field and the ones we know.
            anyhow::anyhow!("invalid SD3Transformer2DModel config: {e}")
        })?;
        config.validate()?;
        Ok(config)
    }

    /// `num_attention_heads * attention_head_dim`: the width of every block.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output latent channels (`out_channels`, or `in_channels` when it is `null`).
    pub fn output_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// `sample_size / patch_size` (floor, as diffusers): the sin-cos grid's base size.
    pub fn base_size(&self) -> usize {
        self.sample_size / self.patch_size.max(1)
    }

    /// The parsed `qk_norm` (call [`validate`](Self::validate) first; unknown values are `None`).
    pub fn qk_norm_kind(&self) -> QkNorm {
        match self.qk_norm.as_deref() {
            Some("rms_norm") => QkNorm::RmsNorm,
            _ => QkNorm::None,
        }
    }

    /// Whether block `index` has the SD3.5 second attention.
    pub fn is_dual_attention(&self, index: usize) -> bool {
        self.dual_attention_layers.contains(&index)
    }

    /// Checks that the config describes a model this implementation computes exactly as
    /// diffusers does, and that its sizes do not overflow.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(class) = &self.class_name {
            ensure!(
                class == SD3_CLASS_NAME,
                "_class_name is {class:?}; only {SD3_CLASS_NAME:?} (Stable Diffusion 3 / 3.5) is \
                 supported"
            );
        }
        for (name, v) in [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.output_channels()),
        ] {
            ensure!(v >= 1, "{name} must be >= 1 (got {v})");
        }
        ensure!(
            self.base_size() >= 1,
            "sample_size {} is smaller than patch_size {}: the sin-cos grid's base size \
             (sample_size / patch_size) would be 0",
            self.sample_size,
            self.patch_size
        );
        let inner = self
            .num_attention_heads
            .checked_mul(self.attention_head_dim)
            .ok_or_else(|| anyhow::anyhow!("num_attention_heads * attention_head_dim overflows"))?;
        ensure!(
            inner.is_multiple_of(4),
            "the inner width num_attention_heads * attention_head_dim = {inner} must be divisible \
             by 4 (the 2-D sin-cos position embedding splits it into 4 parts)"
        );
        ensure!(
            self.caption_projection_dim == inner,
            "caption_projection_dim {} must equal num_attention_heads * attention_head_dim = \
             {inner} (the projected prompt tokens enter the joint attention at that width)",
            self.caption_projection_dim
        );
        if let Some(m) = self.pos_embed_max_size {
            ensure!(m >= 1, "pos_embed_max_size must be >= 1 or null (got 0)");
            m.checked_mul(m)
                .and_then(|n| n.checked_mul(inner))
                .filter(|&n| n <= isize::MAX as usize / 4)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "pos_embed_max_size {m} is too large: its grid of {m}x{m} positions of \
                         width {inner} does not fit in memory"
                    )
                })?;
        }
        // Not a real limit of the architecture (SD3.5-Large has 38 blocks), but a config that
        // would otherwise build a billion block structs before finding the weights missing.
        ensure!(
            self.num_layers <= MAX_LAYERS,
            "num_layers {} is more than the {MAX_LAYERS} this implementation accepts",
            self.num_layers
        );
        // Every weight of a block is at most 9·inner × inner (the SD3.5 modulation).
        inner
            .checked_mul(inner)
            .and_then(|n| n.checked_mul(9))
            .and_then(|n| n.checked_mul(self.num_layers))
            .ok_or_else(|| anyhow::anyhow!("the model's parameter count overflows"))?;
        for &i in &self.dual_attention_layers {
            ensure!(
                i < self.num_layers,
                "dual_attention_layers has {i}, but the model has only {} blocks (0..{})",
                self.num_layers,
                self.num_layers
            );
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => bail!(
                "qk_norm {other:?} is not supported (supported: \"rms_norm\" and null, as in SD3 \
                 and SD3.5)"
            ),
        }
        Ok(())
    }

    /// Checks a latent's spatial size `[height, width]` against the model: both divisible by
    /// `patch_size`, and (with `pos_embed_max_size`) at most `pos_embed_max_size` patches.
    pub fn check_latent_size(&self, height: usize, width: usize) -> anyhow::Result<()> {
        let p = self.patch_size;
        ensure!(
            height >= p && width >= p && height.is_multiple_of(p) && width.is_multiple_of(p),
            "latent size {height}x{width} must be a positive multiple of patch_size {p}"
        );
        if let Some(m) = self.pos_embed_max_size {
            let (h, w) = (height / p, width / p);
            ensure!(
                h <= m && w <= m,
                "latent size {height}x{width} is {h}x{w} patches, more than pos_embed_max_size \
                 {m} on a side"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_take_diffusers_defaults_for_missing_fields() {
        let c = Sd3Config::from_json(r#"{"_class_name": "SD3Transformer2DModel"}"#).unwrap();
        assert_eq!(
            c,
            Sd3Config {
                class_name: Some(SD3_CLASS_NAME.into()),
                ..Sd3Config::default()
            }
        );
        assert_eq!(c.inner_dim(), 1152);
        assert_eq!(c.base_size(), 64);
    }

    #[test]
    fn should_read_nulls_as_diffusers_does() {
        let c = Sd3Config::from_json(
            r#"{"in_channels": 8, "out_channels": null, "pos_embed_max_size": null,
                "qk_norm": null, "_diffusers_version": "0.42.1", "_name_or_path": "x"}"#,
        )
        .unwrap();
        assert_eq!(c.output_channels(), 8);
        assert_eq!(c.pos_embed_max_size, None);
        assert_eq!(c.qk_norm_kind(), QkNorm::None);
    }

    #[test]
    fn should_name_an_unknown_field() {
        let e = Sd3Config::from_json(r#"{"patch_size": 2, "use_rope": true}"#).unwrap_err();
        assert!(format!("{e:#}").contains("use_rope"), "{e:#}");
    }

    #[test]
    fn should_name_the_supported_class() {
        let e = Sd3Config::from_json(r#"{"_class_name": "FluxTransformer2DModel"}"#).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("FluxTransformer2DModel"), "{msg}");
        assert!(msg.contains("SD3Transformer2DModel"), "{msg}");
    }

    #[test]
    fn should_reject_an_unknown_qk_norm() {
        let e = Sd3Config::from_json(r#"{"qk_norm": "layer_norm"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("layer_norm"), "{e:#}");
        let c = Sd3Config::from_json(r#"{"qk_norm": "rms_norm"}"#).unwrap();
        assert_eq!(c.qk_norm_kind(), QkNorm::RmsNorm);
    }

    #[test]
    fn should_reject_inconsistent_sizes() {
        let bad = [
            r#"{"caption_projection_dim": 64}"#,
            r#"{"patch_size": 0}"#,
            r#"{"num_attention_heads": 3, "attention_head_dim": 3, "caption_projection_dim": 9}"#,
            r#"{"dual_attention_layers": [18]}"#,
            r#"{"sample_size": 1}"#,
            r#"{"pos_embed_max_size": 0}"#,
            r#"{"pos_embed_max_size": 18446744073709551615}"#,
            r#"{"num_layers": 18446744073709551615}"#,
            r#"[1, 2]"#,
            r#"{"_class_name": 3}"#,
        ];
        for text in bad {
            assert!(Sd3Config::from_json(text).is_err(), "{text} was accepted");
        }
    }

    #[test]
    fn should_check_latent_sizes() {
        let c = Sd3Config {
            patch_size: 2,
            pos_embed_max_size: Some(8),
            ..Sd3Config::tiny()
        };
        c.check_latent_size(16, 6).unwrap();
        assert!(c.check_latent_size(15, 6).is_err());
        assert!(c.check_latent_size(18, 6).is_err());
        assert!(c.check_latent_size(0, 6).is_err());
        let uncropped = Sd3Config {
            pos_embed_max_size: None,
            ..c
        };
        uncropped.check_latent_size(64, 6).unwrap();
    }
}
