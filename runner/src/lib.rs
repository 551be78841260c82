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
pub mod dist;
pub mod exec;
pub mod fsutil;
pub mod graph;
pub mod node;
pub mod overrides;
pub mod params;
pub mod rundir;
pub mod schema;
pub mod tb;
pub mod yaml;

use std::path::Path;

pub use compile::{Logging, MemoryCheck, Pipeline, compile};
pub use diag::{Diagnostic, Diagnostics, Loc, Source};
pub use dist::{Collective, LaunchEnv, SharedCollective};
pub use exec::{RunError, RunOptions, RunSummary, StartInfo, run};
pub use node::{
    BuildCtx, Inputs, Node, NodeCtx, NodeType, Outputs, PipelineCheck, PortDef, Registry, Resource,
    ResourceSlot, ResourceType, ScheduleFn, ScheduleType, Value, stream_seed,
};
pub use params::{ParamDef, ParamKind, ParamValue, Params};

/// The largest pipeline file [`load`] reads (16 MiB). Real pipelines are a few kilobytes; the cap
/// keeps a wrong path (`/dev/zero`, a dataset, a checkpoint) from being read into memory whole.
pub const MAX_PIPELINE_BYTES: u64 = 16 * 1024 * 1024;

/// Read, parse, override and compile a pipeline file. On success, also returns the warnings.
pub fn load(
    path: &Path,
    overrides: &[String],
    registry: &Registry,
) -> Result<(Pipeline, Diagnostics), Diagnostics> {
    let name = path.display().to_string();
    let text = read_pipeline_file(path, &name).map_err(|d| Diagnostics(vec![d]))?;
    load_str(&name, &text, overrides, registry)
}

/// The text of a pipeline file, read through a bounded reader (the size in the file's metadata
/// is not trusted: `/dev/zero` and pipes report 0). Errors name the file.
fn read_pipeline_file(path: &Path, name: &str) -> Result<String, Diagnostic> {
    let Some(bytes) = fsutil::read_capped(path, MAX_PIPELINE_BYTES)
        .map_err(|e| Diagnostic::error(format!("cannot read pipeline file {name}: {e}")))?
    else {
        return Err(Diagnostic::error(format!(
            "pipeline file {name} is larger than {} MiB, the limit for a pipeline file \
             (is it the right file?)",
            MAX_PIPELINE_BYTES / (1024 * 1024)
        )));
    };
    String::from_utf8(bytes).map_err(|e| not_utf8(name, e.as_bytes(), e.utf8_error()))
}

/// Where the first invalid UTF-8 sequence is: line, column (in characters) and byte offset.
/// The diagnostic shows no excerpt: the file may not be a pipeline at all.
fn not_utf8(name: &str, bytes: &[u8], e: std::str::Utf8Error) -> Diagnostic {
    let offset = e.valid_up_to();
    // The prefix up to the error is valid UTF-8 by definition.
    let valid = std::str::from_utf8(&bytes[..offset]).unwrap_or_default();
    let line = valid.matches('\n').count() + 1;
    let line_start = valid.rfind('\n').map_or(0, |i| i + 1);
    let col = valid[line_start..].chars().count() + 1;
    let what = match e.error_len() {
        Some(n) => {
            let shown: Vec<String> = bytes[offset..offset + n]
                .iter()
                .map(|b| format!("0x{b:02X}"))
                .collect();
            let what = if n == 1 { "byte" } else { "byte sequence" };
            format!("invalid {what} {}", shown.join(" "))
        }
        None => "a truncated multi-byte character at the end of the file".to_string(),
    };
    Diagnostic::error(format!(
        "pipeline file {name} is not UTF-8 text: {what} at line {line}, column {col} \
         (byte offset {offset})"
    ))
    .at(&Source::new(name, ""), Loc::new(line as u32, col as u32), 1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_locate_invalid_utf8_by_line_column_and_byte_offset() {
        let bytes = b"a: 1\nb: \xc3\xa9\xe2\x82\nc: 3\n".to_vec();
        let e = std::str::from_utf8(&bytes).unwrap_err();
        let d = not_utf8("p.yaml", &bytes, e);
        assert_eq!(
            d.message,
            "pipeline file p.yaml is not UTF-8 text: invalid byte sequence 0xE2 0x82 at line 2, \
             column 5 (byte offset 10)"
        );
        assert_eq!(d.position(), "p.yaml:2:5");
        // No excerpt of a file that may not be a pipeline.
        assert!(!d.to_string().contains(" | "), "{d}");
        let cut = b"a: \xe2\x82".to_vec();
        let e = std::str::from_utf8(&cut).unwrap_err();
        assert!(
            not_utf8("p.yaml", &cut, e)
                .message
                .contains("a truncated multi-byte character at the end of the file")
        );
    }
}
