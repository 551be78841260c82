//! [`VaeDecoder`]: diffusers' `AutoencoderKL` decode path — `post_quant_conv` (optional) and
//! the `Decoder`: `conv_in` → mid block → up blocks (lowest resolution first) →
//! GroupNorm + SiLU → `conv_out`.

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::VaeConfig;
use super::blocks::{UNetMidBlock2D, UpDecoderBlock2D, VaeGroupNorm, conv1x1, conv3x3};
use crate::model::fused;

/// diffusers' `Decoder` (`decoder.*` in the state dict).
#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: UNetMidBlock2D,
    /// Lowest resolution first; all but the last upsample 2×.
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: VaeGroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    /// z: [batch, latent_channels, h, w] → [batch, out_channels, h·2^(n−1), w·2^(n−1)]
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        // [batch, block_out_channels[n−1], h, w]
        let mut h = fused::conv2d(&self.conv_in, z);
        h = self.mid_block.forward(h);
        for block in &self.up_blocks {
            h = block.forward(h);
        }
        // [batch, block_out_channels[0], H, W]
        fused::conv2d(&self.conv_out, self.conv_norm_out.forward(h, true))
    }
}

/// The VAE's decode path, with parameter paths equal to diffusers' state-dict keys
/// (`decoder.conv_in.weight`, `decoder.mid_block.attentions.0.to_q.weight`,
/// `post_quant_conv.bias`, …). Load one with [`super::load_vae`].
#[derive(Module, Debug)]
pub struct VaeDecoder {
    pub decoder: Decoder,
    /// Present when `use_post_quant_conv`.
    pub post_quant_conv: Option<Conv2d>,
    #[module(skip)]
    pub config: VaeConfig,
}

impl VaeDecoder {
    /// Decodes latents as diffusers' SD3 pipeline does: `vae.decode(z / scaling_factor +
    /// shift_factor)`. The result is not clamped (SD3 clamps when post-processing).
    ///
    /// latents: [batch, latent_channels, h, w] → [batch, out_channels, h·2^(n−1), w·2^(n−1)]
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let c = &self.config;
        let z = latents.div_scalar(c.scaling_factor).add_scalar(c.shift());
        self.decode_unscaled(z)
    }

    /// diffusers' `vae.decode(z)` itself: `post_quant_conv` (if any) and the decoder, on
    /// latents already unscaled.
    ///
    /// z: [batch, latent_channels, h, w] → [batch, out_channels, h·2^(n−1), w·2^(n−1)]
    pub fn decode_unscaled(&self, z: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(conv) => fused::conv2d(conv, z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// `Err` naming the expected shape unless `dims` is a latent batch this decoder takes
    /// (`[batch, latent_channels, h, w]` with batch, h, w ≥ 1).
    pub fn check_latents(&self, dims: [usize; 4]) -> anyhow::Result<()> {
        let [b, c, h, w] = dims;
        let lc = self.config.latent_channels;
        if c != lc {
            anyhow::bail!(
                "latents have {c} channels ([{b}, {c}, {h}, {w}]) but this VAE decodes \
                 {lc}-channel latents ([batch, {lc}, h, w])"
            );
        }
        if b == 0 || h == 0 || w == 0 {
            anyhow::bail!("latents [{b}, {c}, {h}, {w}] are empty");
        }
        Ok(())
    }

    /// The configuration this decoder was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}

impl VaeConfig {
    /// The decoder's structure with every weight zero and every norm scale one (the loader
    /// overwrites them all). Panics on an invalid config ([`VaeConfig::validate`]).
    pub fn init(&self, device: &Device) -> VaeDecoder {
        if let Err(e) = self.validate() {
            panic!("invalid VaeConfig: {e:#}");
        }
        let g = self.norm_num_groups;
        let ch: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let n = ch.len();
        let up_blocks = (0..n)
            .map(|i| {
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                UpDecoderBlock2D::new(c_in, ch[i], self.layers_per_block + 1, g, i + 1 < n, device)
            })
            .collect();
        VaeDecoder {
            decoder: Decoder {
                conv_in: conv3x3(self.latent_channels, ch[0], device),
                mid_block: UNetMidBlock2D::new(ch[0], g, self.mid_block_add_attention, device),
                up_blocks,
                conv_norm_out: VaeGroupNorm::new(g, ch[n - 1], device),
                conv_out: conv3x3(ch[n - 1], self.out_channels, device),
            },
            post_quant_conv: self
                .use_post_quant_conv
                .then(|| conv1x1(self.latent_channels, self.latent_channels, device)),
            config: self.clone(),
        }
    }

    /// A decoder with deterministic random weights from `seed` (tests, benchmarks): weights
    /// U(±√(3/fan_in)), norm scales 1 + U(±0.2), biases U(±0.1).
    pub fn init_seeded(&self, seed: u64, device: &Device) -> VaeDecoder {
        struct Seeded {
            rng: ChaCha8Rng,
            path: Vec<String>,
        }
        impl ModuleMapper for Seeded {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let (id, tensor, mapper) = param.consume();
                let shape: [usize; D] = tensor.dims();
                let n: usize = shape.iter().product();
                let is_norm = self.path.iter().any(|p| p.contains("norm"));
                let last = self.path.last().map_or("", String::as_str);
                let (base, a) = match (last, D) {
                    ("bias", _) => (0.0, 0.1),
                    ("weight", 1) if is_norm => (1.0, 0.2),
                    // Linear [in, out]; conv [out, in, kh, kw].
                    (_, 2) => (0.0, (3.0 / shape[0] as f64).sqrt()),
                    _ => (
                        0.0,
                        (3.0 / shape[1..].iter().product::<usize>() as f64).sqrt(),
                    ),
                };
                let values: Vec<f32> = (0..n)
                    .map(|_| (base + a * (self.rng.random::<f64>() * 2.0 - 1.0)) as f32)
                    .collect();
                let t = Tensor::<D>::from_data(TensorData::new(values, shape), &tensor.device());
                Param::from_mapped_value(id, t, mapper)
            }
        }
        self.init(device).map(&mut Seeded {
            rng: ChaCha8Rng::seed_from_u64(seed),
            path: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::collect_params;

    fn tiny() -> VaeConfig {
        VaeConfig::new()
            .with_latent_channels(16)
            .with_block_out_channels(vec![8, 16])
            .with_norm_num_groups(4)
            .with_up_block_types(vec!["UpDecoderBlock2D".into(); 2])
            .with_scaling_factor(1.5305)
            .with_shift_factor(Some(0.0609))
    }

    #[test]
    fn should_name_parameters_as_diffusers_state_dict_keys() {
        let names: Vec<String> = collect_params(&tiny().init(&Device::flex()), "")
            .into_iter()
            .map(|t| t.name)
            .collect();
        for key in [
            "decoder.conv_in.weight",
            "decoder.mid_block.resnets.1.norm2.bias",
            "decoder.mid_block.attentions.0.group_norm.weight",
            "decoder.mid_block.attentions.0.to_q.weight",
            "decoder.mid_block.attentions.0.to_out.0.bias",
            "decoder.up_blocks.0.resnets.0.norm1.weight",
            "decoder.up_blocks.0.resnets.1.conv2.weight",
            "decoder.up_blocks.0.upsamplers.0.conv.weight",
            "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
            "decoder.conv_norm_out.weight",
            "decoder.conv_out.bias",
            "post_quant_conv.weight",
        ] {
            assert!(names.iter().any(|n| n == key), "{key} not in {names:?}");
        }
        // The last block does not upsample; the first does not change width.
        assert!(!names.iter().any(|n| n.contains("up_blocks.1.upsamplers")));
        assert!(
            !names
                .iter()
                .any(|n| n.contains("up_blocks.0.resnets.0.conv_shortcut"))
        );
        let no_attn = tiny()
            .with_mid_block_add_attention(false)
            .with_use_post_quant_conv(false);
        let names: Vec<String> = collect_params(&no_attn.init(&Device::flex()), "")
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.contains("attentions") || n.contains("post_quant"))
        );
    }

    #[test]
    fn should_decode_to_the_upscaled_image_size() {
        let d = Device::flex();
        let vae = tiny()
            .with_block_out_channels(vec![8, 8, 16])
            .with_up_block_types(vec!["UpDecoderBlock2D".into(); 3])
            .init_seeded(3, &d);
        let y = vae.decode(Tensor::ones([2, 16, 3, 5], &d));
        assert_eq!(y.dims(), [2, 3, 12, 20]);
        let v = crate::types::to_vec(&y).unwrap();
        assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0));
        assert!(vae.check_latents([2, 16, 3, 5]).is_ok());
        let e = vae.check_latents([2, 3, 32, 32]).unwrap_err().to_string();
        assert!(
            e.contains("3 channels") && e.contains("16-channel latents"),
            "{e}"
        );
    }
}
