//! [`Conditioning`]: what a velocity model is conditioned on, for a batch of B samples.

use anyhow::{Result, bail};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

/// The prompt conditioning of a batch of B samples.
// One value per batch, moved rather than stored in bulk: four tensor handles unboxed are fine.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Conditioning {
    /// Token ids `[B, L]` of a closed vocabulary (ShapeWorld); pad id 0. The null prompt is the
    /// all-pad prompt.
    Tokens(Tensor<2, Int>),
    /// Text-encoder outputs (SD3: CLIP-L, CLIP-G and T5), with the encoded empty prompt as the
    /// null prompt.
    Text(TextConditioning),
}

/// Text-encoder embeddings of B prompts and of the negative (null) prompt.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// [B, L, D]: per-token embeddings (`prompt_embeds`).
    pub prompt_embeds: Tensor<3>,
    /// [B, P]: pooled embeddings (`pooled_prompt_embeds`).
    pub pooled: Tensor<2>,
    /// [1, L, D]: the negative prompt's per-token embeddings.
    pub negative_embeds: Tensor<3>,
    /// [1, P]: the negative prompt's pooled embeddings.
    pub negative_pooled: Tensor<2>,
}

impl From<Tensor<2, Int>> for Conditioning {
    fn from(tokens: Tensor<2, Int>) -> Self {
        Conditioning::Tokens(tokens)
    }
}

impl From<TextConditioning> for Conditioning {
    fn from(text: TextConditioning) -> Self {
        Conditioning::Text(text)
    }
}

impl Conditioning {
    /// Samples in the batch.
    pub fn batch(&self) -> usize {
        match self {
            Conditioning::Tokens(t) => t.dims()[0],
            Conditioning::Text(c) => c.prompt_embeds.dims()[0],
        }
    }

    /// What kind of conditioning this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Conditioning::Tokens(_) => "token ids",
            Conditioning::Text(_) => "text embeddings",
        }
    }

    /// The same conditioning on `device`.
    pub fn to_device(self, device: &Device) -> Self {
        match self {
            Conditioning::Tokens(t) => Conditioning::Tokens(t.to_device(device)),
            Conditioning::Text(c) => Conditioning::Text(TextConditioning {
                prompt_embeds: c.prompt_embeds.to_device(device),
                pooled: c.pooled.to_device(device),
                negative_embeds: c.negative_embeds.to_device(device),
                negative_pooled: c.negative_pooled.to_device(device),
            }),
        }
    }

    /// Rows `idx` (in that order) of the batch, on the conditioning's own device.
    pub fn select(&self, idx: &[usize]) -> Self {
        let device = self.device();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(idx.iter().map(|&i| i as i64).collect(), [idx.len()]),
            &device,
        );
        match self {
            Conditioning::Tokens(t) => Conditioning::Tokens(t.clone().select(0, index)),
            Conditioning::Text(c) => Conditioning::Text(TextConditioning {
                prompt_embeds: c.prompt_embeds.clone().select(0, index.clone()),
                pooled: c.pooled.clone().select(0, index),
                negative_embeds: c.negative_embeds.clone(),
                negative_pooled: c.negative_pooled.clone(),
            }),
        }
    }

    /// The device the conditioning lives on.
    pub fn device(&self) -> Device {
        match self {
            Conditioning::Tokens(t) => t.device(),
            Conditioning::Text(c) => c.prompt_embeds.device(),
        }
    }

    /// The null prompt for every sample: same batch size and kind.
    pub fn null(&self) -> Self {
        match self {
            Conditioning::Tokens(t) => Conditioning::Tokens(t.zeros_like()),
            Conditioning::Text(c) => {
                let [b, l, d] = c.prompt_embeds.dims();
                let [_, p] = c.pooled.dims();
                Conditioning::Text(TextConditioning {
                    prompt_embeds: c.negative_embeds.clone().expand([b, l, d]),
                    pooled: c.negative_pooled.clone().expand([b, p]),
                    negative_embeds: c.negative_embeds.clone(),
                    negative_pooled: c.negative_pooled.clone(),
                })
            }
        }
    }

    /// `self` followed by `other` along the batch: [B1 + B2, …]. Both must be of one kind.
    pub fn cat(self, other: Conditioning) -> Result<Self> {
        Ok(match (self, other) {
            (Conditioning::Tokens(a), Conditioning::Tokens(b)) => {
                Conditioning::Tokens(Tensor::cat(vec![a, b], 0))
            }
            (Conditioning::Text(a), Conditioning::Text(b)) => {
                Conditioning::Text(TextConditioning {
                    prompt_embeds: Tensor::cat(vec![a.prompt_embeds, b.prompt_embeds], 0),
                    pooled: Tensor::cat(vec![a.pooled, b.pooled], 0),
                    negative_embeds: a.negative_embeds,
                    negative_pooled: a.negative_pooled,
                })
            }
            (a, b) => bail!("cannot batch {} with {}", a.kind(), b.kind()),
        })
    }

    /// Replace the rows where `drop[i]` by the null prompt (classifier-free-guidance dropout).
    pub fn drop_rows(self, drop: &[bool]) -> Self {
        if !drop.iter().any(|d| *d) {
            return self;
        }
        let b = drop.len();
        let device = self.device();
        let mask = |dims: usize| -> Tensor<2, Bool> {
            Tensor::<2, Bool>::from_data(TensorData::new(drop.to_vec(), [b, 1]), &device)
                .expand([b, dims])
        };
        match self {
            Conditioning::Tokens(t) => {
                let l = t.dims()[1];
                Conditioning::Tokens(t.mask_fill(mask(l), 0))
            }
            Conditioning::Text(c) => {
                let [_, l, d] = c.prompt_embeds.dims();
                let [_, p] = c.pooled.dims();
                let m3 = mask(l * d).reshape([b, l, d]);
                let prompt_embeds = c
                    .prompt_embeds
                    .mask_where(m3, c.negative_embeds.clone().expand([b, l, d]));
                let pooled = c
                    .pooled
                    .mask_where(mask(p), c.negative_pooled.clone().expand([b, p]));
                Conditioning::Text(TextConditioning {
                    prompt_embeds,
                    pooled,
                    negative_embeds: c.negative_embeds,
                    negative_pooled: c.negative_pooled,
                })
            }
        }
    }

    /// The token ids, or an error naming `arch` and the kind it was given.
    pub fn tokens(&self, arch: &str) -> Result<&Tensor<2, Int>> {
        match self {
            Conditioning::Tokens(t) => Ok(t),
            other => bail!(
                "the `{arch}` model is conditioned on token ids, but the prompts are {}",
                other.kind()
            ),
        }
    }

    /// The text embeddings, or an error naming `arch` and the kind it was given.
    pub fn text(&self, arch: &str) -> Result<&TextConditioning> {
        match self {
            Conditioning::Text(c) => Ok(c),
            other => bail!(
                "the `{arch}` model is conditioned on text embeddings, but the prompts are {}",
                other.kind()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: usize, dev: &Device) -> TextConditioning {
        let v = |n: usize, off: f32| (0..n).map(|i| i as f32 + off).collect::<Vec<_>>();
        TextConditioning {
            prompt_embeds: Tensor::from_data(TensorData::new(v(b * 2 * 3, 0.0), [b, 2, 3]), dev),
            pooled: Tensor::from_data(TensorData::new(v(b * 4, 100.0), [b, 4]), dev),
            negative_embeds: Tensor::from_data(TensorData::new(vec![-1.0; 6], [1, 2, 3]), dev),
            negative_pooled: Tensor::from_data(TensorData::new(vec![-2.0; 4], [1, 4]), dev),
        }
    }

    fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
        t.clone().into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn should_replace_dropped_rows_by_the_negative_prompt() {
        let dev = Device::flex();
        let c = Conditioning::Text(text(3, &dev)).drop_rows(&[false, true, false]);
        let Conditioning::Text(c) = c else { panic!() };
        let e = values(&c.prompt_embeds);
        assert_eq!(&e[0..6], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(&e[6..12], &[-1.0; 6]);
        assert_eq!(&e[12..18], &[12.0, 13.0, 14.0, 15.0, 16.0, 17.0]);
        let p = values(&c.pooled);
        assert_eq!(&p[4..8], &[-2.0; 4]);
        assert_eq!(p[0], 100.0);
    }

    #[test]
    fn should_select_rows_and_make_the_null_batch() {
        let dev = Device::flex();
        let c = Conditioning::Text(text(3, &dev));
        let Conditioning::Text(s) = c.select(&[2, 0]) else {
            panic!()
        };
        assert_eq!(
            values(&s.pooled),
            vec![108.0, 109.0, 110.0, 111.0, 100.0, 101.0, 102.0, 103.0]
        );
        let Conditioning::Text(n) = c.null() else {
            panic!()
        };
        assert_eq!(n.prompt_embeds.dims(), [3, 2, 3]);
        assert!(values(&n.prompt_embeds).iter().all(|v| *v == -1.0));
        let tokens = Conditioning::Tokens(Tensor::<2, Int>::ones([2, 3], &dev));
        assert!(tokens.clone().cat(c).is_err());
        let Conditioning::Tokens(z) = tokens.null() else {
            panic!()
        };
        assert_eq!(
            z.into_data().convert::<i64>().try_to_vec::<i64>().unwrap(),
            vec![0; 6]
        );
    }
}
