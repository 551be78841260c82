//! Activation checkpointing of the SD3 transformer: a forward that keeps only each joint
//! block's inputs, and its backward that runs the blocks again one at a time (see
//! [`Checkpointed`] for the scheme).
//!
//! Memory: the forward holds `num_layers + 1` image-token and context tensors
//! ([B, N, D] + [B, L, D] each) instead of every block's activations; the backward holds one
//! block's graph at a time. Time: one more forward of the network per backward.

use anyhow::{Result, ensure};
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::{Sd3Transformer, cfg_combine};
use crate::model::{Checkpointed, Recompute};

/// `t` on the autodiff device `ad`, as a leaf whose gradient is kept.
fn leaf<const D: usize>(t: Tensor<D>, ad: &Device) -> Tensor<D> {
    t.to_device(ad).autodiff().detach().require_grad()
}

/// `Σ out ⊙ g`: back-propagated, it seeds `out`'s gradient with exactly `g` (a constant).
fn seeded<const D: usize>(out: Tensor<D>, g: Tensor<D>, ad: &Device) -> Tensor<1> {
    (out * g.to_device(ad)).sum()
}

fn add(acc: Option<Tensor<2>>, g: Option<Tensor<2>>) -> Option<Tensor<2>> {
    match (acc, g) {
        (Some(a), Some(g)) => Some(a + g),
        (a, g) => a.or(g),
    }
}

impl Sd3Transformer {
    /// [`try_forward`](Self::try_forward) under activation checkpointing, for a model on an
    /// autodiff device (the inputs on the same device): the output as an autodiff leaf and the
    /// recomputation that back-propagates a gradient at it into the model's parameters.
    pub fn forward_checkpointed(
        &self,
        x: Tensor<4>,
        sigma: Tensor<1>,
        prompt_embeds: Tensor<3>,
        pooled: Tensor<2>,
    ) -> Result<Recompute<'_>> {
        self.check_inputs(
            &x.dims(),
            &sigma.dims(),
            &prompt_embeds.dims(),
            &pooled.dims(),
        )?;
        // The parameters' device: inputs may come without autodiff (constants of the loss).
        let ad = self.proj_out.weight.val().device();
        ensure!(
            ad.is_autodiff(),
            "a checkpointed forward runs a model on an autodiff device"
        );
        let [_, _, hh, ww] = x.dims();
        // The same weights, not requiring gradients: nothing below records a graph, and the
        // forward takes the autodiff backend's kernels (on flex some differ from the plain
        // backend's in rounding), so that the saved inputs are exactly what the recomputed
        // blocks produce and the velocity is the tracked forward's, bit for bit.
        let plain = self.clone().no_grad();
        let (mut hidden, context, temb) = plain.embed(
            x.clone(),
            sigma.clone(),
            prompt_embeds.clone(),
            pooled.clone(),
        );
        // Each block's inputs: (image tokens [B, N, D], context [B, L, D]).
        let mut saved = Vec::with_capacity(plain.transformer_blocks.len());
        let mut context = Some(context);
        for block in &plain.transformer_blocks {
            let ctx = context
                .take()
                .ok_or_else(|| anyhow::anyhow!("a context_pre_only block before the last"))?;
            saved.push((hidden.clone(), ctx.clone()));
            let (h, c) = block.forward(hidden, ctx, temb.clone());
            hidden = h;
            context = c;
        }
        let out = plain.head(hidden.clone(), temb.clone(), [hh, ww]);
        let last = hidden;
        let output = leaf(out, &ad);
        let backward = move |g_out: Tensor<4>, sink: &mut dyn FnMut(burn::tensor::Gradients)| {
            // The head: norm_out and proj_out.
            let (h, t) = (leaf(last, &ad), leaf(temb.clone(), &ad));
            let out = self.head(h.clone(), t.clone(), [hh, ww]);
            let mut grads = seeded(out, g_out, &ad).backward();
            let mut g_h = h.grad_remove(&mut grads);
            let mut g_temb = t.grad_remove(&mut grads);
            let mut g_ctx: Option<Tensor<3>> = None;
            sink(grads);
            // The blocks, last to first.
            for (block, (h_in, c_in)) in self.transformer_blocks.iter().zip(saved).rev() {
                let (h, c, t) = (leaf(h_in, &ad), leaf(c_in, &ad), leaf(temb.clone(), &ad));
                let (h_out, c_out) = block.forward(h.clone(), c.clone(), t.clone());
                let mut loss = g_h.take().map(|g| seeded(h_out, g, &ad));
                if let (Some(c_out), Some(g)) = (c_out, g_ctx.take()) {
                    let s = seeded(c_out, g, &ad);
                    loss = Some(match loss {
                        Some(l) => l + s,
                        None => s,
                    });
                }
                if let Some(loss) = loss.filter(|l| l.is_tracked()) {
                    let mut grads = loss.backward();
                    g_h = h.grad_remove(&mut grads);
                    g_ctx = c.grad_remove(&mut grads);
                    g_temb = add(g_temb, t.grad_remove(&mut grads));
                    sink(grads);
                }
            }
            // The embeddings.
            let (h0, c0, t0) = self.embed(x, sigma, prompt_embeds, pooled);
            let parts = [
                g_h.map(|g| seeded(h0, g, &ad)),
                g_ctx.map(|g| seeded(c0, g, &ad)),
                g_temb.map(|g| seeded(t0, g, &ad)),
            ];
            // Untracked when the embeddings are frozen (LoRA on the blocks only).
            if let Some(loss) = parts.into_iter().flatten().reduce(|a, b| a + b)
                && loss.is_tracked()
            {
                sink(loss.backward());
            }
        };
        Ok(Recompute {
            output,
            backward: Box::new(backward),
        })
    }

    /// [`try_forward_cfg`](Self::try_forward_cfg) under activation checkpointing (`scale <= 1`:
    /// the conditional forward alone).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cfg_checkpointed(
        &self,
        x: Tensor<4>,
        sigma: Tensor<1>,
        prompt_embeds: Tensor<3>,
        pooled: Tensor<2>,
        negative_prompt_embeds: Tensor<3>,
        negative_pooled: Tensor<2>,
        scale: f32,
    ) -> Result<Checkpointed<'_>> {
        if scale <= 1.0 {
            let part = self.forward_checkpointed(x, sigma, prompt_embeds, pooled)?;
            return Ok(Checkpointed::new(part.output.clone(), vec![part]));
        }
        let [b, _, _, _] = x.dims();
        let parts = self
            .cfg_forwards(
                x,
                sigma,
                prompt_embeds,
                pooled,
                negative_prompt_embeds,
                negative_pooled,
            )?
            .into_iter()
            .map(|(x, s, p, q)| self.forward_checkpointed(x, s, p, q))
            .collect::<Result<Vec<_>>>()?;
        let outputs = parts.iter().map(|p| p.output.clone()).collect();
        Ok(Checkpointed::new(cfg_combine(outputs, b, scale), parts))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::{GradientsAccumulator, GradientsParams};
    use burn::tensor::{Device, Tensor};

    use crate::model::checkpoint::tensor_values;
    use crate::model::sd3::{Sd3Config, Sd3Transformer};
    use crate::model::tensor_from_vec;

    /// Every parameter's gradient, in visiting order (empty where it has none).
    struct Collect<'a>(&'a GradientsParams, Vec<Vec<f32>>);

    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = self.0.get::<D>(param.id);
            self.1.push(g.map(tensor_values).unwrap_or_default());
        }
    }

    fn grads_of(m: &Sd3Transformer, g: &GradientsParams) -> Vec<Vec<f32>> {
        let mut c = Collect(g, Vec::new());
        m.visit(&mut c);
        c.1
    }

    fn wave<const D: usize>(shape: [usize; D], s: f32, dev: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        tensor_from_vec((0..n).map(|i| (i as f32 * s).sin()).collect(), shape, dev)
    }

    /// Largest |a − b| over the largest |b|, over all parameters.
    fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        let (mut d, mut m) = (0f32, 0f32);
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.len(), y.len(), "a gradient present in one only");
            for (p, q) in x.iter().zip(y) {
                d = d.max((p - q).abs());
                m = m.max(q.abs());
            }
        }
        assert!(m > 0.0, "no gradient at all");
        d / m
    }

    /// Gradients of `Σ v_cfg ⊙ w` with and without checkpointing, for a negative prompt of
    /// length `neg_len` (the prompt's: one batched forward; another: two forwards).
    fn both(
        c: &Sd3Config,
        neg_len: usize,
        scale: f32,
        lora: bool,
        half: bool,
    ) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        use crate::model::lora::{self, BaseDtype};
        let dev = Device::flex();
        let mut m = c.init(&dev, 5);
        if lora {
            let cfg = lora::LoraConfig::new(4, 8.0);
            m = lora::attach(m, &cfg, &["attn.to_q", "attn.to_v", "ff.net.2"], 1)
                .unwrap()
                .0;
        }
        if half {
            m = lora::cast_base(m, BaseDtype::BF16);
        }
        let m = m.train();
        let ad = dev.autodiff();
        let (b, l) = (2, 3);
        let x = wave([b, c.in_channels, 8, 8], 0.31, &ad);
        let sigma = tensor_from_vec(vec![0.3, 0.8], [b], &ad);
        let pe = wave([b, l, c.joint_attention_dim], 0.17, &ad);
        let pooled = wave([b, c.pooled_projection_dim], 0.23, &ad);
        let npe = wave([b, neg_len, c.joint_attention_dim], 0.11, &ad);
        let npooled = wave([b, c.pooled_projection_dim], 0.05, &ad);
        let w = wave([b, c.output_channels(), 8, 8], 0.7, &ad);

        let v = m
            .try_forward_cfg(
                x.clone(),
                sigma.clone(),
                pe.clone(),
                pooled.clone(),
                npe.clone(),
                npooled.clone(),
                scale,
            )
            .unwrap();
        let v_copy = v.clone().detach();
        let full = GradientsParams::from_grads((v * w.clone()).sum().backward(), &m);

        let ck = m
            .forward_cfg_checkpointed(x, sigma, pe, pooled, npe, npooled, scale)
            .unwrap();
        // The same velocity as the tracked forward's, bit for bit.
        assert_eq!(tensor_values(ck.velocity.clone()), tensor_values(v_copy));
        let loss = (ck.velocity.clone() * w).sum();
        let mut acc = GradientsAccumulator::<Sd3Transformer>::new();
        ck.backward(loss, &mut |g| {
            acc.accumulate(&m, GradientsParams::from_grads(g, &m))
        });
        (grads_of(&m, &acc.grads()), grads_of(&m, &full))
    }

    #[test]
    fn should_give_the_full_backwards_gradients() {
        let c = Sd3Config {
            dual_attention_layers: vec![0],
            qk_norm: Some("rms_norm".into()),
            ..Sd3Config::tiny()
        };
        for (neg_len, scale, lora, half) in [
            (3, 4.5, false, false),
            (2, 4.5, false, false),
            (3, 1.0, false, false),
            (3, 4.5, true, false),
            // A bf16 base (burn-flex computes in bf16 too): activations and seeds in bf16.
            (3, 4.5, true, true),
        ] {
            let (ck, full) = both(&c, neg_len, scale, lora, half);
            let trained = full.iter().filter(|g| !g.is_empty()).count();
            assert!(
                trained > if lora { 10 } else { 40 },
                "{trained} parameters with gradients"
            );
            let d = rel_diff(&ck, &full);
            assert!(d <= 1e-6, "negative length {neg_len}, cfg {scale}: {d:e}");
        }
    }
}
