//! Whole-pipeline checks made at validation, after every node and parameter compiled: what no
//! single parameter shows (a schedule across repeat steps, the memory a run will need).

use runner::Registry;
use runner::compile::{Pipeline, ResourceInst};

pub mod branch;
pub mod checkpointing;
pub mod conditioning;
pub mod lora;
pub mod memory;
pub mod nft;
pub mod schedule;
pub mod window;

pub fn register(r: &mut Registry) {
    r.checks.push(schedule::check);
    r.checks.push(memory::check);
    r.checks.push(conditioning::check);
    r.checks.push(lora::check);
    r.checks.push(checkpointing::check);
    r.checks.push(window::check);
    r.checks.push(nft::check);
    r.checks.push(branch::check);
}

/// The pipeline's `flow_model` resources.
pub fn flow_models(p: &Pipeline) -> impl Iterator<Item = &ResourceInst> {
    p.resources
        .iter()
        .filter(|r| r.ty == crate::flow_model::TYPE)
}
