//! Utility nodes on plain numbers (port type `scalar`): for demos, engine tests and the engine
//! overhead benchmark. They exercise every engine feature — gathering inputs, resources with one
//! writer, checkpointed node state, `every`, failures — without any model.

use std::any::Any;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use runner::{
    BuildCtx, Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry, Resource,
    ResourceSlot, ResourceType,
};

/// The value type of `scalar` ports.
pub type Scalar = f64;

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "constant",
        summary: "emit a constant number every iteration",
        doc: "Outputs `value` (optionally plus `slope` × iteration).",
        inputs: vec![],
        outputs: vec![PortDef::new("value", "scalar", "the number")],
        params: vec![
            ParamDef::float("value", 1.0, f64::MIN, f64::MAX, "the constant"),
            ParamDef::float("slope", 0.0, f64::MIN, f64::MAX, "added per iteration"),
        ],
        resources: vec![],
        factory: |ctx| {
            Ok(Box::new(Constant {
                value: ctx.params.f64("value")?,
                slope: ctx.params.f64("slope")?,
            }))
        },
    });
    r.add_node(NodeType {
        name: "noop",
        summary: "pass a number through (engine overhead benchmark)",
        doc: "Outputs its input, or 0 when unconnected.",
        inputs: vec![PortDef::new("x", "scalar", "any number").optional()],
        outputs: vec![PortDef::new("y", "scalar", "the same number")],
        params: vec![],
        resources: vec![],
        factory: |_| Ok(Box::new(Noop)),
    });
    r.add_node(NodeType {
        name: "sum",
        summary: "add numbers (gathers `node@*.port`)",
        doc: "Outputs the sum of all values on `xs` and logs it as metric `sum`.",
        inputs: vec![PortDef::new("xs", "scalar", "numbers to add").many()],
        outputs: vec![PortDef::new("total", "scalar", "their sum")],
        params: vec![ParamDef::float(
            "scale",
            1.0,
            f64::MIN,
            f64::MAX,
            "multiplies the sum",
        )],
        resources: vec![],
        factory: |ctx| {
            Ok(Box::new(Sum {
                scale: ctx.params.f64("scale")?,
            }))
        },
    });
    r.add_node(NodeType {
        name: "sleep",
        summary: "wait, then pass a number through (concurrency tests)",
        doc: "Sleeps `ms` milliseconds; logs `start_ms` and `end_ms` (wall clock) as metrics.",
        inputs: vec![PortDef::new("x", "scalar", "any number").optional()],
        outputs: vec![PortDef::new("y", "scalar", "the same number")],
        params: vec![ParamDef::int("ms", 10, 0, 600_000, "milliseconds to sleep")],
        resources: vec![],
        factory: |ctx| {
            Ok(Box::new(Sleep {
                ms: ctx.params.usize("ms")? as u64,
            }))
        },
    });
    r.add_node(NodeType {
        name: "fail",
        summary: "fail at a given iteration (error-path tests)",
        doc: "Passes its input through until iteration `at`, where it returns an error.",
        inputs: vec![PortDef::new("x", "scalar", "any number").optional()],
        outputs: vec![PortDef::new("y", "scalar", "the same number")],
        params: vec![
            ParamDef::int("at", 1, 1, i64::MAX, "iteration at which to fail"),
            ParamDef::boolean("panic", false, "panic instead of returning an error"),
        ],
        resources: vec![],
        factory: |ctx| {
            Ok(Box::new(Fail {
                at: ctx.params.i64("at")? as u64,
                panic: ctx.params.bool("panic")?,
            }))
        },
    });
    r.add_node(NodeType {
        name: "accumulate",
        summary: "add the input into an accumulator resource",
        doc: "Adds `x` into the `store` resource (which is checkpointed) and counts its own calls\n(node state, checkpointed too). Logs `total` and `calls`.",
        inputs: vec![PortDef::new("x", "scalar", "amount to add")],
        outputs: vec![PortDef::new("total", "scalar", "the accumulator after adding")],
        params: vec![],
        resources: vec![ResourceSlot {
            name: "store",
            ty: "accumulator",
            write: true,
            doc: "where the running total lives",
        }],
        factory: |_| Ok(Box::new(Accumulate { calls: 0 })),
    });
    r.add_resource(ResourceType {
        name: "accumulator",
        summary: "a running total, saved in checkpoints",
        doc: "A number that `accumulate` nodes add into. Saved as `total.json`.",
        params: vec![ParamDef::float(
            "initial",
            0.0,
            f64::MIN,
            f64::MAX,
            "starting value",
        )],
        factory: |ctx: &BuildCtx| {
            Ok(Box::new(Accumulator {
                total: ctx.params.f64("initial")?,
            }))
        },
    });
}

struct Constant {
    value: f64,
    slope: f64,
}
impl Node for Constant {
    fn run(&mut self, ctx: &NodeCtx, _: &Inputs) -> Result<Outputs> {
        Ok(Outputs::new().with("value", self.value + self.slope * ctx.iteration as f64))
    }
}

struct Noop;
impl Node for Noop {
    fn run(&mut self, _: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let x = if inputs.has("x") {
            *inputs.get::<Scalar>("x")?
        } else {
            0.0
        };
        Ok(Outputs::new().with("y", x))
    }
}

struct Sum {
    scale: f64,
}
impl Node for Sum {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let total: f64 = inputs.all::<Scalar>("xs")?.into_iter().sum::<f64>() * self.scale;
        ctx.metric("sum", total);
        Ok(Outputs::new().with("total", total))
    }
}

struct Sleep {
    ms: u64,
}
fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
impl Node for Sleep {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        ctx.metric("start_ms", now_ms());
        std::thread::sleep(std::time::Duration::from_millis(self.ms));
        ctx.metric("end_ms", now_ms());
        let x = if inputs.has("x") {
            *inputs.get::<Scalar>("x")?
        } else {
            0.0
        };
        Ok(Outputs::new().with("y", x))
    }
}

struct Fail {
    at: u64,
    panic: bool,
}
impl Node for Fail {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        if ctx.iteration == self.at {
            if self.panic {
                panic!("deliberate panic at iteration {}", self.at);
            }
            bail!("deliberate failure at iteration {}", self.at);
        }
        let x = if inputs.has("x") {
            *inputs.get::<Scalar>("x")?
        } else {
            0.0
        };
        Ok(Outputs::new().with("y", x))
    }
}

struct Accumulate {
    calls: u64,
}
impl Node for Accumulate {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let x = *inputs.get::<Scalar>("x")?;
        let total = ctx.write("store", |a: &mut Accumulator| {
            a.total += x;
            Ok(a.total)
        })?;
        self.calls += 1;
        ctx.metric("total", total);
        ctx.metric("calls", self.calls as f64);
        Ok(Outputs::new().with("total", total))
    }
    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"calls": self.calls}))
    }
    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        self.calls = state["calls"]
            .as_u64()
            .context("`calls` missing in node state")?;
        Ok(())
    }
}

/// The `accumulator` resource.
pub struct Accumulator {
    pub total: f64,
}
impl Resource for Accumulator {
    fn save(&self, dir: &Path) -> Result<()> {
        runner::fsutil::write_atomic(
            &dir.join("total.json"),
            serde_json::json!({"total": self.total})
                .to_string()
                .as_bytes(),
        )
    }
    fn load(&mut self, dir: &Path) -> Result<()> {
        let p = dir.join("total.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?;
        self.total = v["total"]
            .as_f64()
            .with_context(|| format!("{}: no `total`", p.display()))?;
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
