//! `weighted_reward`: one reward from several (PickScore + OCR + …), with weights; with
//! `normalise: group` each component is first normalised within its prompt groups, so that
//! rewards of different scales count by their weights (MixGRPO's and DanceGRPO's multi-reward
//! advantages, GDPO's "normalise, then sum").

use anyhow::{Result, bail};
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, PortDef, Registry};
use serde_json::Value;

use crate::grpo::{StdScope, normalise};
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
              that has them. With `normalise: group` each component becomes its group-relative\n\
              advantage (r − mean_group)/(std_group + 1e-4) before weighting, so the total is\n\
              Σ_c w_c·A_c (needs `prompts`, which names the groups); `step_advantage` then\n\
              normalises that sum once more per group, which rescales each group's values but\n\
              keeps their ratios. A non-finite component makes the total non-finite:\n\
              `on_nonfinite` decides (groups come from `prompts` when connected, else the whole\n\
              batch is one group; with `normalise: group` and `skip` a component's non-finite\n\
              values take its group's mean before it is normalised).",
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
            ParamDef::choice(
                "normalise",
                "none",
                &["none", "group"],
                "group: normalise each component within its prompt groups before the weighted sum (multi-reward advantages)",
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
                normalise: ctx.params.str("normalise")? == "group",
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

/// Added to each group's std by `normalise: group` (step_advantage's default `eps`).
const NORM_EPS: f32 = 1e-4;

struct WeightedReward {
    names: Vec<String>,
    weights: Vec<f64>,
    /// `normalise: group`: each component normalised within its groups before the sum.
    normalise: bool,
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
        let groups = match (self.normalise, prompts) {
            (false, _) => None,
            (true, Some(p)) => Some(p.group.as_slice()),
            (true, None) => bail!(
                "weighted_reward `{}`: `normalise: group` needs the `prompts` input (it names each sample's group)",
                ctx.id
            ),
        };
        for (c, name) in comps.iter().zip(&self.names) {
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
        let values: Vec<&[f32]> = comps.iter().map(|c| c.values.as_slice()).collect();
        let (total, filled) = weighted_sum(&values, &self.weights, groups);
        let mut values: Vec<f32> = total.iter().map(|v| *v as f32).collect();
        let bad = match self.on_nonfinite {
            OnNonFinite::Skip => {
                let group = prompts.map_or_else(|| vec![0; n], |p| p.group.clone());
                nonfinite::fill_with_group_mean(&mut values, &group) + filled
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

/// Σ_c w_c·r_c per sample; with `groups`, each component is first normalised within its
/// groups, (r − mean)/(std + 1e-4), its non-finite values replaced by their group's mean. Returns
/// the totals and how many samples had a value replaced.
pub fn weighted_sum(
    components: &[&[f32]],
    weights: &[f64],
    groups: Option<&[usize]>,
) -> (Vec<f64>, usize) {
    let n = components.first().map_or(0, |c| c.len());
    let mut total = vec![0f64; n];
    let mut filled = vec![false; n];
    for (c, w) in components.iter().zip(weights) {
        let values = match groups {
            Some(g) => {
                let mut v = c.to_vec();
                for (f, x) in filled.iter_mut().zip(&v) {
                    *f |= !x.is_finite();
                }
                nonfinite::fill_with_group_mean(&mut v, g);
                normalise(&v, g, StdScope::Group, NORM_EPS)
            }
            None => c.to_vec(),
        };
        for (t, v) in total.iter_mut().zip(&values) {
            *t += w * *v as f64;
        }
    }
    (total, filled.iter().filter(|&&f| f).count())
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

#[cfg(test)]
mod normalise_tests {
    use super::*;

    #[test]
    fn should_sum_raw_rewards_without_normalising() {
        let (t, filled) = weighted_sum(&[&[1.0, 3.0], &[10.0, 30.0]], &[1.0, 0.5], None);
        assert_eq!(t, vec![6.0, 18.0]);
        assert_eq!(filled, 0);
    }

    #[test]
    fn should_normalise_each_component_within_its_groups_before_the_sum() {
        // Two groups of two. A component on a 100× larger scale counts by its weight only.
        let small: &[f32] = &[0.0, 1.0, 2.0, 2.0];
        let large: &[f32] = &[300.0, 100.0, 500.0, 700.0];
        let groups = [0, 0, 1, 1];
        let (t, _) = weighted_sum(&[small, large], &[1.0, 0.5], Some(&groups));
        // Group 0: small → (∓0.5)/(0.5 + 1e-4); large → (±100)/(100 + 1e-4).
        let a = 0.5 / (0.5 + 1e-4);
        let b = 100.0 / (100.0 + 1e-4);
        let want = [-a + 0.5 * b, a - 0.5 * b, 0.0 - 0.5 * b, 0.0 + 0.5 * b];
        for (got, want) in t.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{t:?} vs {want:?}");
        }
        // Without normalising, the large component decides alone.
        let (raw, _) = weighted_sum(&[small, large], &[1.0, 0.5], None);
        assert!(raw[0] > raw[1]);
        assert!(t[0] < t[1]);
    }

    #[test]
    fn should_fill_a_non_finite_component_with_its_group_mean_before_normalising() {
        let c: &[f32] = &[1.0, f32::NAN, 3.0, 0.0, 4.0, 8.0];
        let groups = [0, 0, 0, 1, 1, 1];
        let (t, filled) = weighted_sum(&[c], &[1.0], Some(&groups));
        assert_eq!(filled, 1);
        // Group 0 becomes [1, 2, 3]: the filled sample sits at the mean.
        assert!(t[1].abs() < 1e-9, "{t:?}");
        assert!(t.iter().all(|v| v.is_finite()));
    }
}
