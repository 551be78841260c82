//! `nodes::model::vae` — the decoder of diffusers' `AutoencoderKL` (the VAE of Stable
//! Diffusion 3, FLUX, SDXL…) in burn, loaded from a diffusers folder: rewards need pixels,
//! latent flow models produce latents. Decoder only (no encoder).
//!
//! * [`VaeConfig`] is diffusers' `vae/config.json` ([`VaeConfig::from_file`]): unknown fields,
//!   unsupported block types and activations are errors naming them.
//! * [`VaeDecoder`]'s parameter paths are diffusers' state-dict keys (`decoder.conv_in.weight`,
//!   `decoder.mid_block.attentions.0.to_q.weight`, `decoder.up_blocks.0.resnets.0.norm1.weight`,
//!   `post_quant_conv.*`); [`load_vae`] reads a pipeline folder or its `vae/` folder.
//! * [`VaeDecoder::decode`] maps latents `[B, latent_channels, h, w]` to images
//!   `[B, 3, h·2^(n−1), w·2^(n−1)]` as the SD3 pipeline does: `vae.decode(z / scaling_factor
//!   + shift_factor)`.
//!
//! Architecture (diffusers' `Decoder`, ε = 1e-6, SiLU): `post_quant_conv` (1×1, optional) →
//! `conv_in` (3×3 to the widest level) → mid block (resnet, single-head self-attention over
//! all pixels, resnet) → one `UpDecoderBlock2D` per level, lowest resolution first
//! (`layers_per_block + 1` resnets, then nearest 2× + 3×3 conv except the last) → GroupNorm →
//! SiLU → `conv_out`. Cross-checked against diffusers itself by `tests/vae_diffusers.rs`.

mod blocks;
mod config;
mod decoder;
mod load;

pub use blocks::{
    NORM_EPS, ResnetBlock2D, UNetMidBlock2D, UpDecoderBlock2D, Upsample2D, VaeAttention,
    VaeGroupNorm,
};
pub use config::{SUPPORTED_ACTIVATIONS, SUPPORTED_UP_BLOCKS, VaeConfig};
pub use decoder::{Decoder, VaeDecoder};
pub use load::{ENCODER_PREFIXES, INDEX_FILE, WEIGHTS_FILE, load_vae, save_vae, vae_dir};

#[cfg(test)]
mod tests {
    //! Loading: round trips, dtypes, shards, and every kind of bad folder.

    use std::fs;
    use std::path::{Path, PathBuf};

    use burn::tensor::Device;
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;

    use super::*;
    use crate::model::checkpoint::{NamedTensor, SafetensorsFile};
    use crate::types::to_vec;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowrun-vae-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn tiny() -> VaeConfig {
        VaeConfig::new()
            .with_latent_channels(16)
            .with_block_out_channels(vec![8, 16])
            .with_norm_num_groups(4)
            .with_up_block_types(vec!["UpDecoderBlock2D".into(); 2])
            .with_scaling_factor(1.5305)
            .with_shift_factor(Some(0.0609))
            .with_use_quant_conv(false)
            .with_use_post_quant_conv(true)
    }

    /// The tensors of a saved folder, by name (torch layouts).
    fn tensors(dir: &Path) -> Vec<NamedTensor> {
        let f = SafetensorsFile::read(&dir.join(WEIGHTS_FILE)).unwrap();
        let mut names: Vec<String> = f
            .tensors()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let (shape, values) = f.get(&name).unwrap();
                NamedTensor {
                    name,
                    shape,
                    values,
                }
            })
            .collect()
    }

    /// Writes `tensors` to `path` in `dtype` (F32, F16 or BF16).
    fn write(path: &Path, tensors: &[NamedTensor], dtype: Dtype) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|t| match dtype {
                Dtype::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => t
                    .values
                    .iter()
                    .flat_map(|v| burn::tensor::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::BF16 => t
                    .values
                    .iter()
                    .flat_map(|v| burn::tensor::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                other => panic!("{other:?}"),
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                (
                    t.name.clone(),
                    TensorView::new(dtype, t.shape.clone(), b).unwrap(),
                )
            })
            .collect();
        fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn decode(vae: &VaeDecoder, seed: u64) -> Vec<f32> {
        let d = Device::flex();
        let n = 2 * 16 * 3 * 5;
        let z: Vec<f32> = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        to_vec(&vae.decode(crate::model::tensor_from_vec(z, [2, 16, 3, 5], &d))).unwrap()
    }

    fn load_err(dir: &Path) -> String {
        format!("{:#}", load_vae(dir, &Device::flex()).unwrap_err())
    }

    #[test]
    fn should_load_what_it_saves_and_decode_the_same() {
        let d = Device::flex();
        let dir = tmp("roundtrip");
        let vae = tiny().init_seeded(5, &d);
        save_vae(&dir, &vae).unwrap();
        let (config, again) = load_vae(&dir, &d).unwrap();
        assert_eq!(config, tiny());
        assert_eq!(decode(&vae, 1), decode(&again, 1));
        // Linear weights are [out, in] in the file: q's weight transposed.
        let q = tensors(&dir)
            .into_iter()
            .find(|t| t.name == "decoder.mid_block.attentions.0.to_q.weight")
            .unwrap();
        let burn_q = to_vec(&vae.decoder.mid_block.attentions[0].to_q.weight.val()).unwrap();
        assert_eq!(q.values[1], burn_q[16]);
        // A pipeline folder finds it under vae/.
        let pipe = tmp("pipeline");
        save_vae(&pipe.join("vae"), &vae).unwrap();
        fs::write(pipe.join("model_index.json"), "{}").unwrap();
        assert_eq!(decode(&load_vae(&pipe, &d).unwrap().1, 2), decode(&vae, 2));
        fs::remove_dir_all(dir).ok();
        fs::remove_dir_all(pipe).ok();
    }

    #[test]
    fn should_read_f16_bf16_and_sharded_weights_as_f32() {
        let d = Device::flex();
        let dir = tmp("dtypes");
        let vae = tiny().init_seeded(6, &d);
        save_vae(&dir, &vae).unwrap();
        let all = tensors(&dir);
        // Reference: the weights rounded through bf16, loaded as f32.
        write(&dir.join(WEIGHTS_FILE), &all, Dtype::BF16);
        let bf = load_vae(&dir, &d).unwrap().1;
        let rounded: Vec<NamedTensor> = all
            .iter()
            .map(|t| NamedTensor {
                values: t
                    .values
                    .iter()
                    .map(|v| burn::tensor::bf16::from_f32(*v).to_f32())
                    .collect(),
                ..t.clone()
            })
            .collect();
        write(&dir.join(WEIGHTS_FILE), &rounded, Dtype::F32);
        assert_eq!(decode(&bf, 3), decode(&load_vae(&dir, &d).unwrap().1, 3));
        // f16, in two shards with an index.
        fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
        let (a, b) = all.split_at(all.len() / 2);
        write(&dir.join("part-1.safetensors"), a, Dtype::F16);
        write(&dir.join("part-2.safetensors"), b, Dtype::F16);
        let mut map = serde_json::Map::new();
        for (part, ts) in [("part-1.safetensors", a), ("part-2.safetensors", b)] {
            for t in ts {
                map.insert(t.name.clone(), part.into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        let half = decode(&load_vae(&dir, &d).unwrap().1, 4);
        let full = decode(&vae, 4);
        let max = full.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = half
            .iter()
            .zip(&full)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff > 0.0 && diff < 1e-2 * max,
            "f16 decode off by {diff} (max {max})"
        );
        // An index naming a file outside the folder is refused.
        map.insert("decoder.conv_in.weight".into(), "../x.safetensors".into());
        let index = serde_json::json!({"weight_map": map});
        fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(e.contains("not a .safetensors file in this folder"), "{e}");
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn should_list_unknown_missing_and_misshaped_keys_in_one_error_and_skip_the_encoder() {
        let d = Device::flex();
        let dir = tmp("badkeys");
        save_vae(&dir, &tiny().init_seeded(7, &d)).unwrap();
        let mut all = tensors(&dir);
        // Encoder keys are expected in a full AutoencoderKL and skipped.
        for name in ["encoder.conv_in.weight", "quant_conv.bias"] {
            all.push(NamedTensor {
                name: name.into(),
                shape: vec![2],
                values: vec![0.0; 2],
            });
        }
        write(&dir.join(WEIGHTS_FILE), &all, Dtype::F32);
        assert!(load_vae(&dir, &d).is_ok());
        // One of each problem.
        all.retain(|t| t.name != "decoder.conv_out.bias");
        all.push(NamedTensor {
            name: "decoder.mid_block.attentions.0.proj_attn.weight".into(),
            shape: vec![1],
            values: vec![0.0],
        });
        let q = all
            .iter_mut()
            .find(|t| t.name == "decoder.mid_block.attentions.0.to_q.weight")
            .unwrap();
        q.shape = vec![16, 8, 2];
        write(&dir.join(WEIGHTS_FILE), &all, Dtype::F32);
        let e = load_err(&dir);
        assert!(e.contains(&dir.display().to_string()), "{e}");
        assert!(
            e.contains("1 missing key(s) (in the model, not in the files): decoder.conv_out.bias"),
            "{e}"
        );
        assert!(
            e.contains("1 unknown key(s) (in the files, not in the model): decoder.mid_block.attentions.0.proj_attn.weight"),
            "{e}"
        );
        assert!(
            e.contains("1 mis-shaped key(s): decoder.mid_block.attentions.0.to_q.weight (file [16, 8, 2], model [16, 16])"),
            "{e}"
        );
        assert!(!e.contains("encoder"), "{e}");
        // post_quant_conv weights without `use_post_quant_conv` are unexpected.
        let mut v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        v["use_post_quant_conv"] = false.into();
        fs::write(dir.join("config.json"), v.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("post_quant_conv.bias, post_quant_conv.weight"),
            "{e}"
        );
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn should_name_the_folder_or_file_of_a_bad_vae() {
        let d = Device::flex();
        let dir = tmp("badfolders");
        let e = load_err(&dir.join("nope"));
        assert!(e.contains("does not exist") && e.contains("nope"), "{e}");
        let e = load_err(&dir);
        assert!(e.contains("holds no diffusers VAE"), "{e}");
        fs::write(dir.join("model_index.json"), "{}").unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("pipeline folder") && e.contains("without a VAE"),
            "{e}"
        );
        let vae = dir.join("vae");
        save_vae(&vae, &tiny().init(&d)).unwrap();
        fs::remove_file(vae.join(WEIGHTS_FILE)).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("missing weights") && e.contains(WEIGHTS_FILE),
            "{e}"
        );
        fs::write(vae.join(WEIGHTS_FILE), b"not safetensors").unwrap();
        let e = load_err(&dir);
        assert!(e.contains("is not a safetensors file"), "{e}");
        fs::write(
            vae.join("config.json"),
            r#"{"latent_channels": 16, "colour": 1}"#,
        )
        .unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("config.json") && e.contains("unknown field `colour`"),
            "{e}"
        );
        fs::remove_dir_all(dir).ok();
    }
}
