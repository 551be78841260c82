//! # flowrun node library
//!
//! Each node type lives in its own file with its parameters, ports and docs together;
//! [`registry`] collects them for the engine. `flowrun nodes` prints their documentation.

pub mod annealed_renoiser;
pub mod checks;
pub mod compressibility_reward;
pub mod device;
pub mod dist;
pub mod flow_match_schedule;
pub mod flow_matching_train;
pub mod flow_model;
pub mod flow_sde_step;
pub mod gaussian_noise;
pub mod grpo;
pub mod grpo_update;
pub mod http_reward;
pub mod image_reward;
pub mod model;
pub mod nft_update;
pub mod nonfinite;
pub mod one_step_sampler;
pub mod parquet_source;
pub mod prompt_loader;
pub mod sample_eval;
pub mod shape_eval;
pub mod step_advantage;
pub mod trajectory_sink;
pub mod tree_advantage;
pub mod types;
pub mod util;
pub mod vae;
pub mod vae_decode;
pub mod weighted_reward;
pub mod world;

use runner::Registry;

/// Every node and resource type this library provides.
pub fn registry() -> Registry {
    let mut r = Registry {
        device_check: Some(device::check),
        ..Registry::default()
    };
    util::register(&mut r);
    flow_model::register(&mut r);
    flow_matching_train::register(&mut r);
    sample_eval::register(&mut r);
    prompt_loader::register(&mut r);
    shape_eval::register(&mut r);
    image_reward::register(&mut r);
    http_reward::register(&mut r);
    weighted_reward::register(&mut r);
    compressibility_reward::register(&mut r);
    gaussian_noise::register(&mut r);
    one_step_sampler::register(&mut r);
    annealed_renoiser::register(&mut r);
    flow_sde_step::register(&mut r);
    step_advantage::register(&mut r);
    tree_advantage::register(&mut r);
    grpo_update::register(&mut r);
    nft_update::register(&mut r);
    trajectory_sink::register(&mut r);
    parquet_source::register(&mut r);
    vae::register(&mut r);
    vae_decode::register(&mut r);
    flow_match_schedule::register(&mut r);
    checks::register(&mut r);
    r
}
