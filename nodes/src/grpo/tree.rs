//! BranchGRPO's tree rollouts: trajectories that branch at chosen steps, so that siblings share
//! their prefix, and depth-wise advantages from the reward differences between branches.
//!
//! A prompt's group of G samples is a forest of R roots; at each branching step `at[j]` (0-based
//! step indices, increasing) every node splits into K children, so that after the m = |at|
//! splits there are G = R·K^m leaves, the group's samples. A sample (its `member` index within
//! the group, 0..G) belongs at depth d to node ⌊member / (G / (R·K^d))⌋: the nodes of a depth
//! are contiguous runs of members, so the batch layout stays that of an ordinary GRPO group
//! (every sample is a row) and rows that share a node carry identical states.
//!
//! Step s (0-based) reads states of depth `depth_before(s)` = #{j : at[j] < s} and writes
//! states of depth `depth_after(s)` = #{j : at[j] ≤ s}: a branching step draws one noise per
//! child, every other step one per node. The transition of step s belongs to the node of depth
//! `depth_after(s)` it leads into; BranchGRPO trains every tree edge once, so only the node's
//! first member (its representative row) trains it.
//!
//! Rewards are given to the leaves and fused upward ([`Fusion`]); each depth's node rewards are
//! normalised within the prompt's group, (r − mean_d)/(std_d + eps) with the unbiased std, and
//! 0 where a depth has a single node or its rewards tie (std < 1e-6), as BranchGRPO's public
//! code does. A transition gets the advantage of the node it leads into.

use std::collections::HashMap;

/// A branching schedule, validated against the trajectory's length ([`BranchTree::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchTree {
    /// R: roots per prompt (independent initial noises).
    pub roots: usize,
    /// K: children per node at each branching step (≥ 2).
    pub factor: usize,
    /// The branching steps (0-based, strictly increasing, below `steps`).
    pub at: Vec<usize>,
    /// The trajectory's length.
    pub steps: usize,
}

/// Which branching parameter a [`BranchTree::new`] error is about, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeError {
    pub param: &'static str,
    pub message: String,
}

/// The most leaves a tree may have (a prompt's group size).
pub const MAX_LEAVES: usize = 1 << 16;

impl BranchTree {
    pub fn new(
        roots: usize,
        factor: usize,
        at: Vec<usize>,
        steps: usize,
    ) -> Result<Self, TreeError> {
        let err = |param, message: String| Err(TreeError { param, message });
        if roots == 0 {
            return err("branch_roots", "a tree needs at least one root".into());
        }
        if factor < 2 {
            return err(
                "branch_factor",
                format!(
                    "branch_factor = {factor}: a branching step splits each node into at least 2"
                ),
            );
        }
        for (j, w) in at.windows(2).enumerate() {
            if w[1] <= w[0] {
                return err(
                    "branch_at",
                    format!(
                        "item {} ({}) is not after item {j} ({}): the branching steps must be \
                         strictly increasing",
                        j + 1,
                        w[1],
                        w[0]
                    ),
                );
            }
        }
        if let Some((j, &s)) = at.iter().enumerate().find(|(_, s)| **s >= steps) {
            return err(
                "branch_at",
                format!(
                    "item {j} ({s}) is not a step of the trajectory's {steps} (0-based: 0 to {})",
                    steps.saturating_sub(1)
                ),
            );
        }
        let leaves = u32::try_from(at.len())
            .ok()
            .and_then(|m| factor.checked_pow(m))
            .and_then(|k| k.checked_mul(roots))
            .filter(|&g| g <= MAX_LEAVES);
        if leaves.is_none() {
            return err(
                "branch_at",
                format!(
                    "{roots}·{factor}^{} leaves per prompt exceed {MAX_LEAVES}",
                    at.len()
                ),
            );
        }
        Ok(BranchTree {
            roots,
            factor,
            at,
            steps,
        })
    }

    /// m: the leaves' depth.
    pub fn depth(&self) -> usize {
        self.at.len()
    }

    /// G = R·K^m: the samples of a prompt's group.
    pub fn leaves(&self) -> usize {
        self.nodes_at(self.depth())
    }

    /// R·K^d: the nodes at depth d.
    pub fn nodes_at(&self, d: usize) -> usize {
        self.roots * self.factor.pow(d as u32)
    }

    /// The depth of the states step `s` reads.
    pub fn depth_before(&self, s: usize) -> usize {
        self.at.iter().filter(|&&b| b < s).count()
    }

    /// The depth of the states step `s` writes (of the node its transition leads into).
    pub fn depth_after(&self, s: usize) -> usize {
        self.at.iter().filter(|&&b| b <= s).count()
    }

    /// The node of depth `d` that group member `member` belongs to.
    pub fn node(&self, member: usize, d: usize) -> usize {
        member / (self.leaves() / self.nodes_at(d))
    }

    /// The first member (the representative) of node `node` of depth `d`.
    pub fn first_member(&self, node: usize, d: usize) -> usize {
        node * (self.leaves() / self.nodes_at(d))
    }

    /// For every row of a batch (`group[i]`, `member[i]`): the row of its node's representative
    /// at depth `d`. Fails, naming the missing member, when a group is not whole in the batch
    /// or its size is not the tree's.
    pub fn representatives(
        &self,
        group: &[usize],
        member: &[usize],
        d: usize,
    ) -> Result<Vec<usize>, String> {
        let g = self.leaves();
        if let Some(i) = member.iter().position(|&m| m >= g) {
            return Err(format!(
                "sample {i} is member {} of its group, but the tree has {g} leaves per prompt \
                 (branch_roots·branch_factor^|branch_at| = {}·{}^{}): set the group size to {g}",
                member[i],
                self.roots,
                self.factor,
                self.depth()
            ));
        }
        let row: HashMap<(usize, usize), usize> = group
            .iter()
            .zip(member)
            .enumerate()
            .map(|(i, (&g, &m))| ((g, m), i))
            .collect();
        group
            .iter()
            .zip(member)
            .map(|(&gi, &m)| {
                let rep = self.first_member(self.node(m, d), d);
                row.get(&(gi, rep)).copied().ok_or_else(|| {
                    format!(
                        "group {gi} has no member {rep} in this batch: a branching rollout needs \
                         each prompt's {g} samples together (group size {g})"
                    )
                })
            })
            .collect()
    }
}

/// How leaf rewards become the rewards of inner nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fusion {
    /// The mean of the node's leaves (BranchGRPO's default).
    Mean,
    /// Σ_c softmax(α·ℓ_c)·r_c over the node's children, depth by depth from the leaves, where ℓ_c
    /// is the log-prob of the child's edge: the sum of the old log-probs of the transitions
    /// that lead into the child (BranchGRPO's path-probability weighting).
    Prob { alpha: f32 },
}

/// Which leaves train the transitions after the last branching step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WidthPruning {
    /// Every leaf.
    None,
    /// The ⌈f·G⌉ leaves of highest advantage.
    Top(f32),
    /// The ⌈f·G/2⌉ best and the ⌈f·G/2⌉ worst leaves.
    Extremes(f32),
}

/// Advantages and training mask of a tree rollout, per step (0-based) and row.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeAdvantages {
    pub values: Vec<Vec<f32>>,
    pub mask: Vec<Vec<bool>>,
    /// Node rewards per group, depth and node (after fusion): `node_reward[g][d][n]`.
    pub node_reward: Vec<Vec<Vec<f32>>>,
}

/// The advantages of a tree rollout.
///
/// `rewards[i]`: the final reward of row i (a leaf); `group`/`member`: each row's prompt group
/// and member index (whole groups of `tree.leaves()`); `logprob[s][i]`: the old log-prob of
/// step s at row i (used by [`Fusion::Prob`]); `prune_depths`: depths whose transitions are
/// not trained (BranchGRPO's depth pruning); `width`: pruning of the leaves' transitions.
#[allow(clippy::too_many_arguments)]
pub fn tree_advantages(
    tree: &BranchTree,
    rewards: &[f32],
    group: &[usize],
    member: &[usize],
    logprob: &[Vec<f32>],
    fusion: Fusion,
    eps: f32,
    prune_depths: &[usize],
    width: WidthPruning,
) -> Result<TreeAdvantages, String> {
    let b = rewards.len();
    if group.len() != b || member.len() != b {
        return Err(format!(
            "{b} rewards for {} samples",
            group.len().min(member.len())
        ));
    }
    if logprob.len() != tree.steps || logprob.iter().any(|l| l.len() != b) {
        return Err(format!(
            "the tree has {} steps, but {} transitions came (of {b} samples each)",
            tree.steps,
            logprob.len()
        ));
    }
    let m = tree.depth();
    let g_size = tree.leaves();
    // Every row's representative at each depth (checks that groups are whole).
    let reps: Vec<Vec<usize>> = (0..=m)
        .map(|d| tree.representatives(group, member, d))
        .collect::<Result<_, _>>()?;
    let n_groups = group.iter().copied().max().map_or(0, |g| g + 1);
    // The row of each (group, leaf).
    let mut leaf_row = vec![vec![usize::MAX; g_size]; n_groups];
    for (i, (&g, &mm)) in group.iter().zip(member).enumerate() {
        leaf_row[g][mm] = i;
    }
    // ℓ of the edge into each node of depth d ≥ 1, at the node's representative row: the sum of
    // the log-probs of the steps that write depth d.
    let edge_logprob = |row: usize, d: usize| -> f32 {
        (0..tree.steps)
            .filter(|&s| tree.depth_after(s) == d)
            .map(|s| logprob[s][row])
            .sum()
    };
    let mut node_reward = Vec::with_capacity(n_groups);
    let mut node_adv = Vec::with_capacity(n_groups);
    for rows in &leaf_row {
        if rows.contains(&usize::MAX) {
            // A group index without samples (not in this batch).
            node_reward.push(vec![]);
            node_adv.push(vec![]);
            continue;
        }
        let mut per_depth = vec![Vec::new(); m + 1];
        per_depth[m] = rows.iter().map(|&i| rewards[i]).collect::<Vec<f32>>();
        for d in (0..m).rev() {
            let children = &per_depth[d + 1];
            let k = tree.factor;
            per_depth[d] = (0..tree.nodes_at(d))
                .map(|n| {
                    let kids = n * k..(n + 1) * k;
                    match fusion {
                        Fusion::Mean => {
                            children[kids].iter().map(|&r| r as f64).sum::<f64>() as f32 / k as f32
                        }
                        Fusion::Prob { alpha } => {
                            let ell: Vec<f64> = kids
                                .clone()
                                .map(|c| {
                                    let row = rows[tree.first_member(c, d + 1)];
                                    alpha as f64 * edge_logprob(row, d + 1) as f64
                                })
                                .collect();
                            let top = ell.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                            let w: Vec<f64> = ell.iter().map(|l| (l - top).exp()).collect();
                            let z: f64 = w.iter().sum();
                            kids.zip(&w)
                                .map(|(c, w)| w / z * children[c] as f64)
                                .sum::<f64>() as f32
                        }
                    }
                })
                .collect();
        }
        node_adv.push(
            per_depth
                .iter()
                .map(|r| depth_normalise(r, eps))
                .collect::<Vec<_>>(),
        );
        node_reward.push(per_depth);
    }
    // Width pruning: the leaves kept per group.
    let kept_leaf: Vec<Vec<bool>> = node_adv
        .iter()
        .map(|adv| {
            if adv.is_empty() {
                return vec![];
            }
            width_kept(&adv[m], width)
        })
        .collect();
    let mut values = vec![vec![0f32; b]; tree.steps];
    let mut mask = vec![vec![false; b]; tree.steps];
    for s in 0..tree.steps {
        let d = tree.depth_after(s);
        for i in 0..b {
            let (g, mm) = (group[i], member[i]);
            let n = tree.node(mm, d);
            values[s][i] = node_adv[g][d][n];
            mask[s][i] =
                reps[d][i] == i && !prune_depths.contains(&d) && (d < m || kept_leaf[g][mm]);
        }
    }
    Ok(TreeAdvantages {
        values,
        mask,
        node_reward,
    })
}

/// One depth's node rewards normalised: (r − mean)/(std + eps) with the unbiased std; all 0
/// for a single node or tied rewards (std < 1e-6).
pub fn depth_normalise(r: &[f32], eps: f32) -> Vec<f32> {
    let n = r.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let std = var.sqrt();
    if std < 1e-6 {
        return vec![0.0; n];
    }
    r.iter()
        .map(|&v| ((v as f64 - mean) / (std + eps as f64)) as f32)
        .collect()
}

/// Which of a group's leaves (by advantage) width pruning keeps.
fn width_kept(adv: &[f32], width: WidthPruning) -> Vec<bool> {
    let n = adv.len();
    let mut order: Vec<usize> = (0..n).collect();
    // Highest advantage first; ties by member index.
    order.sort_by(|&a, &b| adv[b].total_cmp(&adv[a]).then(a.cmp(&b)));
    let mut keep = vec![false; n];
    match width {
        WidthPruning::None => keep.fill(true),
        WidthPruning::Top(f) => {
            let k = ((f as f64 * n as f64).ceil() as usize).clamp(1, n);
            for &i in &order[..k] {
                keep[i] = true;
            }
        }
        WidthPruning::Extremes(f) => {
            let k = ((f as f64 * n as f64 / 2.0).ceil() as usize).clamp(1, n);
            for &i in order[..k.min(n)].iter().chain(&order[n - k.min(n)..]) {
                keep[i] = true;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> BranchTree {
        // 5 steps, splits after step 0 and at step 3: 1 root → 2 → 4 leaves.
        BranchTree::new(1, 2, vec![1, 3], 5).unwrap()
    }

    #[test]
    fn should_place_members_in_nested_contiguous_nodes() {
        let t = tree();
        assert_eq!(t.leaves(), 4);
        assert_eq!(
            (0..5).map(|s| t.depth_before(s)).collect::<Vec<_>>(),
            vec![0, 0, 1, 1, 2]
        );
        assert_eq!(
            (0..5).map(|s| t.depth_after(s)).collect::<Vec<_>>(),
            vec![0, 1, 1, 2, 2]
        );
        assert_eq!(
            (0..4).map(|m| t.node(m, 1)).collect::<Vec<_>>(),
            vec![0, 0, 1, 1]
        );
        assert_eq!((0..4).map(|m| t.node(m, 0)).collect::<Vec<_>>(), vec![0; 4]);
        assert_eq!(t.first_member(1, 1), 2);
        // Two groups, interleaved rows: each row's representative is its node's first member.
        let group = [1, 0, 0, 1, 0, 1, 0, 1];
        let member = [0, 0, 1, 1, 2, 2, 3, 3];
        assert_eq!(
            t.representatives(&group, &member, 1).unwrap(),
            vec![0, 1, 1, 0, 4, 5, 4, 5]
        );
        let err = t.representatives(&[0, 0, 0], &[0, 1, 3], 1).unwrap_err();
        assert!(err.contains("group 0 has no member 2"), "{err}");
        let err = t.representatives(&[0], &[4], 1).unwrap_err();
        assert!(err.contains("set the group size to 4"), "{err}");
    }

    #[test]
    fn should_refuse_schedules_that_do_not_fit() {
        let e = BranchTree::new(1, 2, vec![2, 2], 5).unwrap_err();
        assert_eq!(e.param, "branch_at");
        assert!(e.message.contains("strictly increasing"), "{}", e.message);
        let e = BranchTree::new(1, 2, vec![1, 5], 5).unwrap_err();
        assert!(
            e.message.contains("item 1 (5) is not a step"),
            "{}",
            e.message
        );
        assert_eq!(
            BranchTree::new(1, 1, vec![1], 5).unwrap_err().param,
            "branch_factor"
        );
        assert_eq!(
            BranchTree::new(0, 2, vec![1], 5).unwrap_err().param,
            "branch_roots"
        );
        let e = BranchTree::new(1, 2, (0..40).collect(), 50).unwrap_err();
        assert!(e.message.contains("exceed"), "{}", e.message);
    }

    #[test]
    fn should_give_depth_wise_advantages_on_a_hand_made_reward_tree() {
        let t = tree();
        // One group; leaves 0..4 rewarded 1, 3, 0, 0.
        let rewards = [1.0, 3.0, 0.0, 0.0];
        let (group, member) = ([0; 4], [0, 1, 2, 3]);
        let lp = vec![vec![0.0; 4]; 5];
        let a = tree_advantages(
            &t,
            &rewards,
            &group,
            &member,
            &lp,
            Fusion::Mean,
            0.0,
            &[],
            WidthPruning::None,
        )
        .unwrap();
        // Depth 1: nodes {0,1} → 2 and {2,3} → 0: mean 1, unbiased std √2.
        assert_eq!(a.node_reward[0][1], vec![2.0, 0.0]);
        assert_eq!(a.node_reward[0][0], vec![1.0]);
        let h = 1.0 / 2f32.sqrt();
        // Depth 2: mean 1, unbiased std √((0+4+1+1)/3) = √2.
        let s2 = 2f32.sqrt();
        let leaf = [0.0, 2.0 / s2, -1.0 / s2, -1.0 / s2];
        for (s, want) in [
            (0, vec![0.0; 4]),
            (1, vec![h, h, -h, -h]),
            (2, vec![h, h, -h, -h]),
            (3, leaf.to_vec()),
            (4, leaf.to_vec()),
        ] {
            for (x, y) in a.values[s].iter().zip(&want) {
                assert!(
                    (x - y).abs() < 1e-6,
                    "step {s}: {:?} vs {want:?}",
                    a.values[s]
                );
            }
        }
        // Each edge trains once: at its node's first member.
        assert_eq!(a.mask[0], vec![true, false, false, false]);
        assert_eq!(a.mask[1], vec![true, false, true, false]);
        assert_eq!(a.mask[2], vec![true, false, true, false]);
        assert_eq!(a.mask[3], vec![true; 4]);
        // Depth pruning drops depth 1's edges; width pruning keeps the best half of the leaves
        // (ties by member) or the best and the worst.
        let pruned = tree_advantages(
            &t,
            &rewards,
            &group,
            &member,
            &lp,
            Fusion::Mean,
            0.0,
            &[1],
            WidthPruning::Top(0.5),
        )
        .unwrap();
        assert_eq!(pruned.mask[1], vec![false; 4]);
        assert_eq!(pruned.mask[0], a.mask[0]);
        assert_eq!(pruned.mask[4], vec![true, true, false, false]);
        assert_eq!(pruned.values, a.values);
        let ext = tree_advantages(
            &t,
            &rewards,
            &group,
            &member,
            &lp,
            Fusion::Mean,
            0.0,
            &[],
            WidthPruning::Extremes(0.5),
        )
        .unwrap();
        assert_eq!(ext.mask[4], vec![false, true, false, true]);
    }

    #[test]
    fn should_weight_children_by_their_edge_probability() {
        let t = BranchTree::new(1, 2, vec![0], 2).unwrap();
        let rewards = [1.0, 0.0];
        // Child 0's edge (steps 0 and 1) has log-prob 0.5 + 0.5 more than child 1's.
        let lp = vec![vec![0.5, 0.0], vec![0.5, 0.0]];
        let a = tree_advantages(
            &t,
            &rewards,
            &[0, 0],
            &[0, 1],
            &lp,
            Fusion::Prob { alpha: 2.0 },
            0.0,
            &[],
            WidthPruning::None,
        )
        .unwrap();
        // softmax(2·[1, 0]) = [e²/(e²+1), 1/(e²+1)]: the root's reward.
        let e2 = 2f32.exp();
        let want = e2 / (e2 + 1.0);
        assert!(
            (a.node_reward[0][0][0] - want).abs() < 1e-6,
            "{:?}",
            a.node_reward
        );
        let mean = tree_advantages(
            &t,
            &rewards,
            &[0, 0],
            &[0, 1],
            &lp,
            Fusion::Mean,
            0.0,
            &[],
            WidthPruning::None,
        )
        .unwrap();
        assert_eq!(mean.node_reward[0][0], vec![0.5]);
    }

    #[test]
    fn should_give_no_advantage_to_a_single_node_or_tied_rewards() {
        assert_eq!(depth_normalise(&[3.0], 0.0), vec![0.0]);
        assert_eq!(depth_normalise(&[2.0, 2.0, 2.0], 0.0), vec![0.0; 3]);
        let a = depth_normalise(&[0.0, 1.0], 0.0);
        let s = 0.5f32.sqrt();
        assert!(
            (a[0] + 0.5 / s).abs() < 1e-6 && (a[1] - 0.5 / s).abs() < 1e-6,
            "{a:?}"
        );
    }
}
