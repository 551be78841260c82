//! A `flow_model`'s `lora:` settings, checked at validation: the mapping itself (unknown keys,
//! rank, alpha, dropout, …) and, where the model's structure is known without its weights (the
//! ShapeWorld UNet; an SD3 diffusers folder's config.json), that every given target pattern
//! names a linear layer of it; and `base_dtype` (half precision needs `lora:`, `arch: sd3`
//! and a libtorch device), located at that parameter.

use std::path::Path;

use runner::{Diagnostics, Pipeline};

use crate::flow_model::base_dtype_problem;
use crate::model::FlowModelConfig;
use crate::model::lora::{self, BaseDtype, LoraConfig};
use crate::model::sd3::read_config;
use crate::world;

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut diags = Diagnostics::default();
    for r in super::flow_models(p) {
        let Ok(value) = r.params.json("lora") else {
            continue;
        };
        if let Ok(dtype) = r
            .params
            .str("base_dtype")
            .unwrap_or("f32")
            .parse::<BaseDtype>()
        {
            let arch = r.params.str("arch").unwrap_or("shapes_unet");
            if let Some(why) = base_dtype_problem(dtype, arch, !value.is_null(), &p.device) {
                diags.push(r.params.error("base_dtype", why));
            } else if dtype.is_half() && !p.device.starts_with("libtorch-cuda") {
                let mut d = r.params.error(
                    "base_dtype",
                    format!(
                        "`{}` on a CPU: libtorch's half-precision matmuls are far slower than \
                         f32 ones on CPUs without bf16/f16 instructions (about 150× on AVX2); \
                         it saves memory, not time (on CUDA it saves both)",
                        dtype.name()
                    ),
                );
                d.severity = runner::diag::Severity::Warning;
                diags.push(d);
            }
        }
        let cfg = match LoraConfig::from_json(&value) {
            Ok(Some(cfg)) => cfg,
            Ok(None) => continue,
            Err(e) => {
                diags.push(r.params.error("lora", format!("{e:#}")));
                continue;
            }
        };
        if cfg.targets.is_empty() {
            continue;
        }
        // The layer names, from a lazy (never allocated) model of the resource's architecture.
        let device = burn::tensor::Device::flex();
        let names = match r.params.str("arch").unwrap_or("shapes_unet") {
            "sd3" => {
                let Some(dir) = r.params.opt_str("diffusers").ok().flatten() else {
                    continue; // a flowrun checkpoint: checked when the run loads it
                };
                let Ok((_, c)) = read_config(Path::new(dir)) else {
                    continue; // reported when the run builds its resources
                };
                if c.validate().is_err() {
                    continue;
                }
                lora::linear_paths(&mut c.init_zeros(&device))
            }
            _ => {
                if r.params.opt_str("checkpoint").ok().flatten().is_some() {
                    continue;
                }
                let c = match r.params.str("size") {
                    Ok("tiny") => FlowModelConfig::tiny(world::vocab_size(), world::MAX_TOKENS),
                    _ => FlowModelConfig::small(world::vocab_size(), world::MAX_TOKENS),
                };
                let mut m = c.init_zeros(&device);
                lora::linear_paths(&mut m)
            }
        };
        let targets: Vec<&str> = cfg.targets.iter().map(String::as_str).collect();
        let unmatched = lora::unmatched(&targets, &names);
        if !unmatched.is_empty() {
            diags.push(
                r.params
                    .error("lora", lora::unmatched_message(&unmatched, &names)),
            );
        }
    }
    diags
}
