//! The values that travel along edges, with their port type names.
//!
//! | port type    | Rust type        | what                                                   |
//! |--------------|------------------|--------------------------------------------------------|
//! | `prompts`    | [`PromptBatch`]  | B = P·G samples: P prompts, each repeated G times       |
//! | `images`     | [`Images`]       | [B, C, H, W]: states x_t, x̂0, latents or pixels (below) |
//! | `prediction` | [`Prediction`]   | one model evaluation at t: x_t, v, x̂0, ε̂               |
//! | `transition` | [`Transition`]   | a stochastic policy step x_t → x_t' with its log-prob  |
//! | `rewards`    | [`Rewards`]      | one reward per sample (+ verifier criteria)            |
//! | `advantages` | [`Advantages`]   | [transitions][samples] group-relative advantages       |

use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Int, Tensor};

use crate::grpo::{BranchTree, LinearGaussian};
use crate::model::{Conditioning, TextConditioning, int_tensor_from_vec, tensor_from_vec};
use crate::world::PromptRecord;

/// One prompt of a batch: its id and text, what its dataset says about it, and — for
/// ShapeWorld prompts — the structured target its verifier checks.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Unique id within its dataset, e.g. `train-00042`.
    pub id: String,
    /// The prompt text.
    pub prompt: String,
    /// The dataset's own fields besides the text (ShapeWorld: `category`, `target`; GenEval:
    /// `tag`, `include`, …), passed on to reward servers.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The ShapeWorld record, for the nodes that verify ShapeWorld images.
    pub shapes: Option<Arc<PromptRecord>>,
    /// Row of the prompt in its embeddings file (prompt_loader's `embeddings`).
    pub embedding_row: Option<usize>,
}

impl Prompt {
    /// A ShapeWorld prompt.
    pub fn from_shapes(rec: Arc<PromptRecord>) -> Self {
        let mut metadata = serde_json::Map::new();
        metadata.insert("category".into(), rec.category.as_str().into());
        metadata.insert(
            "target".into(),
            serde_json::to_value(&rec.target).unwrap_or(serde_json::Value::Null),
        );
        Prompt {
            id: rec.id.clone(),
            prompt: rec.prompt.clone(),
            metadata,
            shapes: Some(rec),
            embedding_row: None,
        }
    }

    /// The ShapeWorld record, or an error saying that `node` needs ShapeWorld prompts.
    pub fn shapes(&self, node: &str) -> anyhow::Result<&PromptRecord> {
        self.shapes.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "`{node}` verifies ShapeWorld prompts, but prompt `{}` (\"{}\") is not one",
                self.id,
                self.prompt
            )
        })
    }

    /// The prompt's category (its dataset's `category`, or `tag` as GenEval names it), or "".
    pub fn category(&self) -> &str {
        ["category", "tag"]
            .iter()
            .find_map(|k| self.metadata.get(*k).and_then(|v| v.as_str()))
            .unwrap_or("")
    }
}

/// Prompts of one iteration, already expanded into GRPO groups.
#[derive(Debug, Clone)]
pub struct PromptBatch {
    /// One record per sample (each prompt's record repeated G times, consecutively).
    pub records: Vec<Arc<Prompt>>,
    /// Group (prompt) index of each sample, 0..P.
    pub group: Vec<usize>,
    /// Index of each sample within its group, 0..G.
    pub member: Vec<usize>,
    /// Token ids, [B, L] row-major.
    pub tokens: Vec<i64>,
    pub max_tokens: usize,
    /// Text-encoder embeddings, one row per group, when the prompts come from an embeddings
    /// file (models conditioned on text embeddings); `None` for token-id prompts.
    pub embeddings: Option<Arc<GroupEmbeddings>>,
    /// In a data-parallel run, this rank's share of the iteration's global batch starts at
    /// this sample and this group (0 in a single process): Parquet's `sample` and `group`
    /// columns are global.
    pub sample_offset: usize,
    pub group_offset: usize,
}

/// Text-encoder embeddings of a batch's prompts, one row per group (prompt), on the host.
#[derive(Debug, Clone)]
pub struct GroupEmbeddings {
    /// [P, L, D] row-major.
    pub prompt_embeds: Vec<f32>,
    /// [P, Q] row-major.
    pub pooled: Vec<f32>,
    /// [1, L, D]: the negative (null) prompt.
    pub negative_embeds: Vec<f32>,
    /// [1, Q]
    pub negative_pooled: Vec<f32>,
    /// L
    pub seq_len: usize,
    /// D
    pub dim: usize,
    /// Q
    pub pooled_dim: usize,
    /// The embeddings as device tensors, uploaded once per device and shared by every sampler
    /// step and update of the batch.
    pub uploaded: UploadCache,
}

/// Device copies of a batch's [`GroupEmbeddings`] (empty when cloned).
#[derive(Default)]
pub struct UploadCache(std::sync::Mutex<Vec<(Device, TextConditioning)>>);

impl Clone for UploadCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for UploadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UploadCache")
    }
}

impl GroupEmbeddings {
    /// Every group's embeddings and the negative, on `device` (uploaded at the first call).
    pub fn on_device(&self, device: &Device) -> TextConditioning {
        let mut cache = self.uploaded.0.lock().unwrap_or_else(|e| e.into_inner());
        // Device equality ignores autodiff: a plain and an autodiff copy are kept apart.
        let same = |d: &Device| d == device && d.is_autodiff() == device.is_autodiff();
        if let Some((_, t)) = cache.iter().find(|(d, _)| same(d)) {
            return t.clone();
        }
        let p = self.prompt_embeds.len() / (self.seq_len * self.dim).max(1);
        let (l, d, q) = (self.seq_len, self.dim, self.pooled_dim);
        let text = TextConditioning {
            prompt_embeds: tensor_from_vec(self.prompt_embeds.clone(), [p, l, d], device),
            pooled: tensor_from_vec(self.pooled.clone(), [p, q], device),
            negative_embeds: tensor_from_vec(self.negative_embeds.clone(), [1, l, d], device),
            negative_pooled: tensor_from_vec(self.negative_pooled.clone(), [1, q], device),
        };
        cache.push((device.clone(), text.clone()));
        text
    }
}

impl PromptBatch {
    pub fn len(&self) -> usize {
        self.records.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
    pub fn groups(&self) -> usize {
        self.group.iter().copied().max().map_or(0, |g| g + 1)
    }
    /// The model conditioning of every sample, on `device`: token ids, or the text
    /// embeddings of each sample's group.
    pub fn conditioning(&self, device: &Device) -> Conditioning {
        let all: Vec<usize> = (0..self.len()).collect();
        self.conditioning_rows(&all, device)
    }

    /// The conditioning of samples `idx` (in that order), on `device`.
    pub fn conditioning_rows(&self, idx: &[usize], device: &Device) -> Conditioning {
        let Some(e) = &self.embeddings else {
            return Conditioning::Tokens(self.tokens_rows(idx, device));
        };
        let groups: Vec<usize> = idx.iter().map(|&i| self.group[i]).collect();
        let text = e.on_device(device);
        Conditioning::Text(text).select(&groups)
    }

    /// [B, L]
    pub fn tokens_tensor(&self, device: &Device) -> Tensor<2, Int> {
        int_tensor_from_vec(self.tokens.clone(), [self.len(), self.max_tokens], device)
    }
    /// Rows `idx` of the tokens, [idx.len(), L].
    pub fn tokens_rows(&self, idx: &[usize], device: &Device) -> Tensor<2, Int> {
        let l = self.max_tokens;
        let mut v = Vec::with_capacity(idx.len() * l);
        for &i in idx {
            v.extend_from_slice(&self.tokens[i * l..(i + 1) * l]);
        }
        int_tensor_from_vec(v, [idx.len(), l], device)
    }
}

/// Largest difference between two timesteps that are meant to be equal (one schedule value
/// computed twice, or kept in f32): below it the steps chain.
pub const T_TOLERANCE: f64 = 1e-6;

/// A batch of images or noisy states. x_t = (1 − t)·x0 + t·ε; t = 0 for clean images.
///
/// ShapeWorld's model works on pixels, [B, 3, 32, 32] in [-1, 1]; a latent model's states
/// are latents ([B, 16, h, w] for SD3's VAE) that `vae_decode` turns into pixels
/// [B, 3, H, W]. Rewards take pixels of any size ([`Images::rgb`]).
#[derive(Debug, Clone)]
pub struct Images {
    /// [B, C, H, W]
    pub tensor: Tensor<4>,
    /// The timestep of the state (1 = pure noise, 0 = an image or a prediction x̂0); a sampler
    /// refuses a state whose t is not its own ([`Images::expect_t`]).
    pub t: f32,
}

impl Images {
    pub fn from_vec(v: Vec<f32>, batch: usize, t: f32, device: &Device) -> Self {
        Images {
            tensor: tensor_from_vec(v, [batch, 3, 32, 32], device),
            t,
        }
    }
    pub fn batch(&self) -> usize {
        self.tensor.dims()[0]
    }
    /// [C, H, W] of each image.
    pub fn image_shape(&self) -> [usize; 3] {
        let [_, c, h, w] = self.tensor.dims();
        [c, h, w]
    }
    /// The pixels on the host, CHW per image, with (height, width): `Err` unless these are
    /// RGB images ([B, 3, H, W]), e.g. latents not yet decoded. `port` names the input in the
    /// message.
    pub fn rgb(&self, port: &str) -> anyhow::Result<(Vec<f32>, usize, usize)> {
        let [c, h, w] = self.image_shape();
        if c != 3 {
            anyhow::bail!(
                "input `{port}` holds {c}-channel images ([{}, {c}, {h}, {w}]): rewards score RGB \
                 images [B, 3, H, W] in [-1, 1] (decode latents with `vae_decode` first)",
                self.batch()
            );
        }
        Ok((self.to_vec()?, h, w))
    }
    /// Fail unless this state is at the sampler's own timestep `t` (the state arrived on input
    /// `port`): a schedule whose steps do not chain, naming both values.
    pub fn expect_t(&self, port: &str, t: f32) -> anyhow::Result<()> {
        if (f64::from(self.t) - f64::from(t)).abs() > T_TOLERANCE {
            anyhow::bail!(
                "input `{port}` is a state at t = {} but this step's `t` is {t}: the schedule does \
                 not chain (a step's `t` must be the previous step's `t_next`)",
                self.t
            );
        }
        Ok(())
    }
    pub fn to_vec(&self) -> anyhow::Result<Vec<f32>> {
        to_vec(&self.tensor)
    }
}

/// Copy a tensor to the host as f32.
pub fn to_vec<const D: usize>(t: &Tensor<D>) -> anyhow::Result<Vec<f32>> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("cannot read tensor data: {e:?}"))
}

/// One model evaluation at timestep t.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub t: f32,
    /// Step index k (1-based) within the sampler's loop.
    pub step: usize,
    /// [B, 3, H, W] the state x_t the model saw
    pub x_t: Tensor<4>,
    /// [B, 3, H, W] velocity v_θ(x_t, t, c) (with CFG if used)
    pub v: Tensor<4>,
    /// [B, 3, H, W] one-step prediction x̂0 = x_t − t·v
    pub x0: Tensor<4>,
    /// [B, 3, H, W] noise estimate ε̂ = x_t + (1 − t)·v
    pub eps: Tensor<4>,
    pub cfg: f32,
    /// The velocity's autodiff graph when the policy keeps rollout graphs
    /// (`rollout_graph: keep`); handed on to the transition.
    pub graph: Option<RolloutGraph>,
}

/// A stochastic policy step x_t → x_next, x_next ~ N(a·x_t + b·v_θ(x_t, t, c), std²).
#[derive(Debug, Clone)]
pub struct Transition {
    /// Transition index k (1-based): from prediction k to prediction k+1.
    pub step: usize,
    pub t: f32,
    pub t_next: f32,
    /// Temperature τ (TAFS) or noise level (Flow-GRPO SDE).
    pub tau: f32,
    pub kernel: LinearGaussian,
    /// The std of this step's stochastic kernel: `kernel.std`, except for the deterministic
    /// (ODE) steps of a MixGRPO window, where it is the std the step's SDE kernel has inside
    /// the window (TempFlow-GRPO's noise-aware weights compare the steps by it).
    pub sde_std: f32,
    /// Classifier-free guidance scale used when sampling (the updater recomputes v the same way).
    pub cfg: f32,
    /// [B, 3, H, W]
    pub x_t: Tensor<4>,
    /// [B, 3, H, W]
    pub x_next: Tensor<4>,
    /// log π_old(x_next | x_t) per sample (mean over dimensions).
    pub old_logprob: Vec<f32>,
    /// Name of the sampler (`tafs`, `flow_sde`).
    pub sampler: &'static str,
    /// The sampling forward's autodiff graph (`rollout_graph: keep`): `grpo_update`'s first,
    /// exactly on-policy step back-propagates through it instead of recomputing v_θ.
    pub graph: Option<RolloutGraph>,
    /// BranchGRPO: the tree of a branching rollout this transition is step `step − 1` of
    /// (`None` for an ordinary rollout). `tree_advantage` reads it.
    pub branch: Option<Arc<BranchTree>>,
}

/// The autodiff graph of one sampling-time velocity v_θ(x_t, t, c), kept so that the update
/// can back-propagate through the rollout's own forward instead of running it again.
///
/// It holds the tracked velocity ([B, 3, H, W] on the policy trainer's autodiff device) and
/// the trainer's optimizer-step count when it was computed: the graph is the update's forward
/// only while no optimizer step has been taken since. It is taken (not cloned) by its user, so
/// the graph's memory goes with the first backward through it.
#[derive(Debug, Clone)]
pub struct RolloutGraph {
    velocity: Arc<Mutex<Option<Tensor<4>>>>,
    /// Optimizer steps the policy had taken when the velocity was computed.
    pub trainer_step: u64,
}

impl RolloutGraph {
    pub fn new(velocity: Tensor<4>, trainer_step: u64) -> Self {
        RolloutGraph {
            velocity: Arc::new(Mutex::new(Some(velocity))),
            trainer_step,
        }
    }

    /// The tracked velocity, leaving this handle (and its clones) empty.
    pub fn take(&self) -> Option<Tensor<4>> {
        self.velocity.lock().ok()?.take()
    }

    /// Move the graph into a new handle, e.g. from a prediction to its transition, so that the
    /// prediction no longer keeps it alive.
    pub fn pass_on(&self) -> Option<RolloutGraph> {
        self.take().map(|v| RolloutGraph::new(v, self.trainer_step))
    }
}

/// Rows `idx` of a state tensor, on its own device (no copy when `idx` is the whole batch in
/// order): minibatches are sliced where the states live.
pub fn select_rows(x: &Tensor<4>, idx: &[usize]) -> Tensor<4> {
    if idx.len() == x.dims()[0] && idx.iter().enumerate().all(|(j, &i)| i == j) {
        return x.clone();
    }
    let order = int_tensor_from_vec(
        idx.iter().map(|&i| i as i64).collect(),
        [idx.len()],
        &x.device(),
    );
    x.clone().select(0, order)
}

/// One reward per sample.
#[derive(Debug, Clone, Default)]
pub struct Rewards {
    pub values: Vec<f32>,
    /// Whether the sample is fully correct (verifier rewards), else empty.
    pub correct: Vec<bool>,
    /// Per-criterion results (name, passed or None when not applicable), per sample.
    pub criteria: Vec<Vec<(String, Option<bool>)>>,
    /// Which step's prediction was scored (1-based), or 0 for the final image.
    pub step: usize,
}

/// Advantages per transition and sample: `values[k][i]`.
#[derive(Debug, Clone)]
pub struct Advantages {
    pub values: Vec<Vec<f32>>,
    pub mode: String,
    /// `mask[k][i]`: whether sample i trains transition k (`None`: every one does). Samples of
    /// a branching rollout that share a tree node share its transition, which is trained once
    /// (BranchGRPO): the update's loss is then a mean over the trained pairs.
    pub mask: Option<Vec<Vec<bool>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_upload_a_batchs_embeddings_once_per_device() {
        let (p, l, d, q) = (2, 3, 4, 5);
        let e = GroupEmbeddings {
            prompt_embeds: (0..p * l * d).map(|v| v as f32).collect(),
            pooled: (0..p * q).map(|v| -(v as f32)).collect(),
            negative_embeds: vec![0.5; l * d],
            negative_pooled: vec![0.25; q],
            seq_len: l,
            dim: d,
            pooled_dim: q,
            uploaded: Default::default(),
        };
        let dev = Device::flex();
        let a = e.on_device(&dev);
        let b = e.on_device(&dev);
        assert_eq!(e.uploaded.0.lock().unwrap().len(), 1);
        assert_eq!(a.prompt_embeds.dims(), [p, l, d]);
        let vals = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(vals(a.prompt_embeds), e.prompt_embeds);
        assert_eq!(vals(b.negative_embeds), e.negative_embeds);
        // An autodiff device gets its own copy; a clone of the batch starts empty.
        let ad = e.on_device(&dev.clone().autodiff());
        assert_eq!(e.uploaded.0.lock().unwrap().len(), 2);
        assert_eq!(ad.pooled.into_data().try_to_vec::<f32>().unwrap(), e.pooled);
        assert!(e.clone().uploaded.0.lock().unwrap().is_empty());
    }
}
