//! `activation_checkpointing` on a `flow_model`, checked at validation: it recomputes the SD3
//! transformer's blocks, so it needs `arch: sd3`.

use runner::{Diagnostics, Pipeline};

use crate::flow_model::CHECKPOINTING_ARCH;

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut diags = Diagnostics::default();
    for r in super::flow_models(p) {
        let on = r.params.bool("activation_checkpointing").unwrap_or(false);
        if on && r.params.str("arch").unwrap_or("shapes_unet") != "sd3" {
            diags.push(
                r.params
                    .error("activation_checkpointing", CHECKPOINTING_ARCH),
            );
        }
    }
    diags
}
