//! # flowrun engine
//!
//! A declarative pipeline runner: a YAML file describes a DAG of typed nodes; the engine
//! validates it (every error at once, located in the file), expands repeat blocks, and runs it
//! once per iteration with concurrency, metrics, checkpoints and resume.
//!
//! The engine knows nothing about images or reinforcement learning: node and resource types
//! come from a [`Registry`] that a node library fills.

pub mod compile;
pub mod diag;
pub mod exec;
pub mod fsutil;
pub mod graph;
pub mod node;
pub mod overrides;
pub mod params;
pub mod rundir;
pub mod schema;
pub mod yaml;

use std::path::Path;

pub use compile::{MemoryCheck, Pipeline, compile};
pub use diag::{Diagnostic, Diagnostics, Loc, Source};
pub use exec::{RunError, RunOptions, RunSummary, run};
pub use node::{
    BuildCtx, Inputs, Node, NodeCtx, NodeType, Outputs, PipelineCheck, PortDef, Registry, Resource,
    ResourceSlot, ResourceType, Value,
};
pub use params::{ParamDef, ParamKind, ParamValue, Params};

/// Read, parse, override and compile a pipeline file. On success, also returns the warnings.
pub fn load(
    path: &Path,
    overrides: &[String],
    registry: &Registry,
) -> Result<(Pipeline, Diagnostics), Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostics(vec![Diagnostic::error(format!(
            "cannot read pipeline file {}: {e}",
            path.display()
        ))])
    })?;
    load_str(&path.display().to_string(), &text, overrides, registry)
}

/// Like [`load`], from text.
pub fn load_str(
    name: &str,
    text: &str,
    overrides: &[String],
    registry: &Registry,
) -> Result<(Pipeline, Diagnostics), Diagnostics> {
    let source = Source::new(name, text);
    let mut doc = yaml::parse(&source).map_err(|d| Diagnostics(vec![d]))?;
    let mut diags = Diagnostics::default();
    for o in overrides {
        if let Err(d) = overrides::apply(&mut doc, o) {
            diags.push(d);
        }
    }
    if diags.has_errors() {
        return Err(diags);
    }
    compile(&doc, registry)
}
