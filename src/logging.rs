//! Tracing setup: human text (or JSON) on stderr, and JSON lines in the run directory's
//! `log.jsonl` once the run directory exists.

use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, filter::LevelFilter};

/// Writes to the run's log file (a no-op until the run directory is created).
#[derive(Clone, Copy)]
struct RunLogWriter;

impl Write for RunLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut g) = runner::exec::RUN_LOG.lock()
            && let Some(f) = g.as_mut()
        {
            f.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for RunLogWriter {
    type Writer = RunLogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

pub fn init(json: bool, verbose: bool, quiet: bool) {
    let level = if quiet {
        LevelFilter::WARN
    } else if verbose || json {
        LevelFilter::INFO
    } else {
        LevelFilter::WARN
    };
    let stderr_filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .with_env_var("FLOWRUN_LOG")
        .from_env_lossy();
    let stderr = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(stderr_filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(stderr_filter)
            .boxed()
    };
    let file = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(RunLogWriter)
        .with_filter(LevelFilter::INFO);
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}
