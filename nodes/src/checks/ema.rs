//! A `flow_model`'s EMA ramp (`ema_ramp`, `ema_ramp_rate`, `ema_ramp_flat`): the linear ramp's
//! parameters do nothing under the warm-up, and a ramp needs an EMA to move.

use runner::{Diagnostics, Pipeline};

use super::flow_models;

const LINEAR_PARAMS: [&str; 2] = ["ema_ramp_rate", "ema_ramp_flat"];

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut d = Diagnostics::default();
    for r in flow_models(p) {
        let ramp = r.params.str("ema_ramp").unwrap_or("warmup");
        if ramp != "linear" {
            for name in LINEAR_PARAMS {
                if r.params.at.contains_key(name) {
                    d.push(
                        r.params
                            .error(
                                name,
                                format!(
                                    "has no effect with ema_ramp `{ramp}` (only `linear` reads it)"
                                ),
                            )
                            .help("set `ema_ramp: linear`, or leave this out"),
                    );
                }
            }
        } else if r.params.f64("ema_decay").is_ok_and(|v| v == 0.0) {
            d.push(
                r.params
                    .error("ema_ramp", "a linear ramp with `ema_decay: 0` keeps no EMA to ramp (ema_decay is its cap)")
                    .help("set `ema_decay` to the ramp's cap (DiffusionNFT's: 0.5), or drop `ema_ramp`"),
            );
        }
    }
    d
}
