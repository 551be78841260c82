//! `nft_update`: its re-noising range must not be empty (`t_min` ≤ `t_max`).

use runner::{Diagnostics, Pipeline};

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut d = Diagnostics::default();
    for n in p.nodes.iter().filter(|n| n.ty == "nft_update") {
        let (Ok(lo), Ok(hi)) = (n.params.f64("t_min"), n.params.f64("t_max")) else {
            continue;
        };
        if lo > hi {
            d.push(
                n.params
                    .error(
                        "t_min",
                        format!("t_min = {lo} is above t_max = {hi}: no time to re-noise at"),
                    )
                    .help("re-noising times are drawn uniformly from [t_min, t_max]"),
            );
        }
    }
    d
}
