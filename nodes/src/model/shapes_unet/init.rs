//! Deterministic weight initialisation (seeded ChaCha RNG per parameter path; never burn's
//! global RNG, which is shared across threads and therefore not reproducible under concurrency).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::FlowModel;
use crate::model::standard_normal;

/// FNV-1a, so that each parameter gets its own stream independent of traversal order.
fn hash_path(path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// How a parameter is initialised, decided from its path and shape.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Zeros,
    Ones,
    /// N(0, std²)
    Normal(f64),
    /// U(−a, a)
    Uniform(f64),
}

fn rule(path: &str, shape: &[usize], text_layers: usize) -> Init {
    let last = path.rsplit('.').next().unwrap_or(path);
    if last == "gamma" {
        return Init::Ones;
    }
    if last == "beta" || last == "bias" {
        return Init::Zeros;
    }
    // Zero-initialised residual outputs (ADM-style): the model starts as identity blocks and
    // predicts v = 0.
    if path == "out_conv.weight"
        || path.ends_with("conv2.weight")
        || path.ends_with("film.weight")
        || (path.contains("attn.") && path.ends_with("proj.weight"))
    {
        return Init::Zeros;
    }
    if path.ends_with("token_embedding.weight") || path.ends_with("pos_embedding") {
        return Init::Normal(0.02);
    }
    // Text transformer residual projections: GPT-2 style scaled init.
    if path.starts_with("text.layers.")
        && (last == "weight")
        && (path.ends_with("proj.weight") || path.ends_with("fc2.weight"))
    {
        let fan_in = shape[0] as f64;
        return Init::Normal(1.0 / fan_in.sqrt() / (2.0 * text_layers.max(1) as f64).sqrt());
    }
    // Linear [d_in, d_out] or conv [c_out, c_in, kh, kw]: variance 1/fan_in.
    let fan_in = match shape.len() {
        2 => shape[0],
        4 => shape[1] * shape[2] * shape[3],
        _ => shape.iter().product::<usize>().max(1),
    } as f64;
    Init::Uniform((3.0 / fan_in).sqrt())
}

struct InitMapper {
    seed: u64,
    text_layers: usize,
    path: Vec<String>,
}

impl ModuleMapper for InitMapper {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let path = self.path.join(".");
        let shape: [usize; D] = tensor.dims();
        let n: usize = shape.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ hash_path(&path));
        let values: Vec<f32> = match rule(&path, &shape, self.text_layers) {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => (0..n)
                .map(|_| (standard_normal(&mut rng) * std) as f32)
                .collect(),
            Init::Uniform(a) => (0..n)
                .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * a) as f32)
                .collect(),
        };
        let require_grad = tensor.is_require_grad();
        let mut new = Tensor::<D>::from_data(TensorData::new(values, shape), &tensor.device());
        if require_grad {
            new = new.require_grad();
        }
        Param::from_mapped_value(id, new, mapper)
    }
}

/// Re-initialises every parameter of `model` deterministically from `seed`.
pub(crate) fn init_weights(model: FlowModel, seed: u64) -> FlowModel {
    let text_layers = model.text.layers.len();
    model.map(&mut InitMapper {
        seed,
        text_layers,
        path: Vec::new(),
    })
}
