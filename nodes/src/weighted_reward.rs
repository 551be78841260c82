//! `weighted_reward`: one reward from several (PickScore + OCR + …), with weights.

use anyhow::{Result, bail};
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, PortDef, Registry};
use serde_json::Value;

use crate::nonfinite::{self, OnNonFinite};
use crate::shape_eval::log_metrics;
use crate::types::{PromptBatch, Rewards};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "weighted_reward",
        summary: "combine several rewards into one weighted sum",
        doc: "reward_i = Σ_c w_c · r_c,i over the components on `rewards`, in the order they are\n\
              listed (`rewards: [pick.rewards, ocr.rewards]`). `weights` is a list with one entry\n\
              per component: a number (`[1.0, 0.5]`, components named c1, c2, …) or a one-key\n\
              mapping naming it (`[{pickscore: 1.0}, {ocr: 0.5}]`). Every component must have one\n\
              value per sample. Logs each component's unweighted mean as `<name>_mean` and the\n\
              total as `reward_mean`. `correct`/`criteria` are taken from the first component\n\
              that has them. A non-finite component makes the total non-finite: `on_nonfinite`\n\
              decides (groups come from `prompts` when connected, else the whole batch is one\n\
              group).",
        inputs: vec![
            PortDef::new(
                "rewards",
                "rewards",
                "the component rewards, in weight order",
            )
            .many(),
            PortDef::new(
                "prompts",
                "prompts",
                "the batch: names prompts in errors, gives the groups for `on_nonfinite: skip`",
            )
            .optional(),
        ],
        outputs: vec![PortDef::new("rewards", "rewards", "the weighted sum")],
        params: vec![
            ParamDef::new(
                "weights",
                ParamKind::Any,
                "one weight per component: [1.0, 0.5] or [{pickscore: 1.0}, {ocr: 0.5}]",
            ),
            nonfinite::param(),
        ],
        resources: vec![],
        factory: |ctx| {
            let (names, weights) = parse_weights(&ctx.params.json("weights")?)
                .map_err(|e| anyhow::anyhow!("weighted_reward `{}`: {e}", ctx.id))?;
            Ok(Box::new(WeightedReward {
                names,
                weights,
                on_nonfinite: OnNonFinite::from_params(ctx.params)?,
            }))
        },
    });
}

/// Names and weights from the `weights` parameter.
pub fn parse_weights(v: &Value) -> Result<(Vec<String>, Vec<f64>)> {
    let Some(list) = v.as_array() else {
        if v.is_object() {
            bail!(
                "`weights` must be a list (a mapping does not keep its order): write \
                 [{{name: weight}}, …] in the order of the `rewards` inputs"
            );
        }
        bail!("`weights` must be a list of numbers or {{name: weight}} entries, found {v}");
    };
    if list.is_empty() {
        bail!("`weights` is empty");
    }
    let (mut names, mut weights) = (Vec::new(), Vec::new());
    for (i, e) in list.iter().enumerate() {
        let (name, w) = match e {
            Value::Number(n) => (format!("c{}", i + 1), n.as_f64()),
            Value::Object(m) if m.len() == 1 => {
                let (k, v) = m.iter().next().expect("one entry");
                (k.clone(), v.as_f64())
            }
            other => bail!(
                "`weights`[{i}] must be a number or a one-key mapping {{name: weight}}, found {other}"
            ),
        };
        let Some(w) = w.filter(|w| w.is_finite()) else {
            bail!("`weights`[{i}] (`{name}`) is not a finite number");
        };
        if names.contains(&name) {
            bail!("`weights` names `{name}` twice");
        }
        names.push(name);
        weights.push(w);
    }
    Ok((names, weights))
}

struct WeightedReward {
    names: Vec<String>,
    weights: Vec<f64>,
    on_nonfinite: OnNonFinite,
}

impl Node for WeightedReward {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let comps = inputs.all::<Rewards>("rewards")?;
        let prompts = if inputs.has("prompts") {
            Some(inputs.get::<PromptBatch>("prompts")?)
        } else {
            None
        };
        if comps.len() != self.weights.len() {
            bail!(
                "weighted_reward `{}`: {} reward inputs but {} weights ({})",
                ctx.id,
                comps.len(),
                self.weights.len(),
                self.names.join(", ")
            );
        }
        let n = comps[0].values.len();
        for (c, name) in comps.iter().zip(&self.names) {
            if c.values.len() != n {
                bail!(
                    "weighted_reward `{}`: component `{name}` has {} rewards, `{}` has {n}",
                    ctx.id,
                    c.values.len(),
                    self.names[0]
                );
            }
        }
        if let Some(p) = prompts
            && p.len() != n
        {
            bail!(
                "weighted_reward `{}`: {n} rewards for {} prompts",
                ctx.id,
                p.len()
            );
        }
        let describe = |i: usize| match prompts {
            Some(p) => format!(
                "sample {i} (prompt `{}`: \"{}\")",
                p.records[i].id, p.records[i].prompt
            ),
            None => format!("sample {i}"),
        };
        let mut total = vec![0f64; n];
        for ((c, name), w) in comps.iter().zip(&self.names).zip(&self.weights) {
            let finite: Vec<f64> = c
                .values
                .iter()
                .filter(|v| v.is_finite())
                .map(|v| *v as f64)
                .collect();
            if !finite.is_empty() {
                ctx.metric(
                    &format!("{name}_mean"),
                    finite.iter().sum::<f64>() / finite.len() as f64,
                );
            }
            for (t, v) in total.iter_mut().zip(&c.values) {
                *t += w * *v as f64;
            }
            if self.on_nonfinite == OnNonFinite::Error
                && let Some(i) = c.values.iter().position(|v| !v.is_finite())
            {
                bail!(
                    "weighted_reward `{}`: component `{name}` is {} for {}; the iteration is not \
                     applied (set `on_nonfinite: skip` to give such samples their group's mean)",
                    ctx.id,
                    c.values[i],
                    describe(i)
                );
            }
        }
        let mut values: Vec<f32> = total.iter().map(|v| *v as f32).collect();
        let bad = match self.on_nonfinite {
            OnNonFinite::Skip => {
                let group = prompts.map_or_else(|| vec![0; n], |p| p.group.clone());
                nonfinite::fill_with_group_mean(&mut values, &group)
            }
            OnNonFinite::Error => {
                // Finite components can still overflow to ±inf.
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    bail!(
                        "weighted_reward `{}`: the weighted sum is {} for {}",
                        ctx.id,
                        values[i],
                        describe(i)
                    );
                }
                0
            }
        };
        let first = comps
            .iter()
            .find(|c| !c.criteria.is_empty() || !c.correct.is_empty());
        let r = Rewards {
            values,
            correct: first.map(|c| c.correct.clone()).unwrap_or_default(),
            criteria: first.map(|c| c.criteria.clone()).unwrap_or_default(),
            step: comps[0].step,
        };
        log_metrics(ctx, &r);
        ctx.metric("nonfinite", bad as f64);
        Ok(Outputs::new().with("rewards", r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn should_parse_listed_and_named_weights() {
        let (n, w) = parse_weights(&json!([1.0, 0.5])).unwrap();
        assert_eq!((n, w), (vec!["c1".into(), "c2".into()], vec![1.0, 0.5]));
        let (n, w) = parse_weights(&json!([{"pick": 2}, {"ocr": -0.5}])).unwrap();
        assert_eq!((n, w), (vec!["pick".into(), "ocr".into()], vec![2.0, -0.5]));
        for bad in [
            json!({"pick": 1}),
            json!([]),
            json!(["x"]),
            json!([{"a": 1}, {"a": 2}]),
        ] {
            assert!(parse_weights(&bad).is_err(), "{bad}");
        }
    }
}
