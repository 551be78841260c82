//! Whole-pipeline checks made at validation, after every node and parameter compiled: what no
//! single parameter shows (a schedule across repeat steps, the memory a run will need).

use runner::Registry;
use runner::compile::{NodeInst, Pipeline, ResourceInst};

pub mod branch;
pub mod checkpointing;
pub mod conditioning;
pub mod ema;
pub mod lora;
pub mod memory;
pub mod nft;
pub mod reward;
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
    r.checks.push(ema::check);
    r.checks.push(reward::check);
    r.checks.push(branch::check);
}

/// The pipeline's `flow_model` resources.
pub fn flow_models(p: &Pipeline) -> impl Iterator<Item = &ResourceInst> {
    p.resources
        .iter()
        .filter(|r| r.ty == crate::flow_model::TYPE)
}

/// Step 1 of the repeat that expanded `n`.
pub(crate) fn first_step<'a>(p: &'a Pipeline, n: &NodeInst) -> Option<&'a NodeInst> {
    let base = n.id.split('@').next()?;
    let id = format!("{base}@1");
    p.nodes.iter().find(|m| m.id == id)
}

/// A parameter's value as the messages show it.
pub(crate) fn show(n: &NodeInst, name: &str) -> String {
    n.params
        .values
        .get(name)
        .map_or_else(|| "unset".into(), |v| v.to_string())
}

/// The node feeding input `port` of `n` (its first source).
pub(crate) fn source<'a>(p: &'a Pipeline, n: &NodeInst, port: &str) -> Option<&'a NodeInst> {
    n.inputs
        .iter()
        .find(|(name, _)| *name == port)
        .and_then(|(_, s)| s.first())
        .map(|&(i, _)| &p.nodes[i])
}
