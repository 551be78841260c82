//! Data-parallel runs: the process group a run's ranks share.
//!
//! The engine knows nothing about what is reduced. A [`Collective`] is a handful of operations
//! on host buffers (all-reduce, broadcast, all-gather, barrier) between the `world` processes
//! of one run; the node library provides one (libtorch's c10d) and nodes reach it through
//! [`crate::NodeCtx::collective`]. With no collective (or a world of one), a run is exactly
//! the single-process run.
//!
//! What the engine itself does with it ([`crate::run`]): rank 0 creates the run directory and
//! tells the others its path; rank 0 alone writes `run.json`, `pipeline.yaml`, metrics,
//! TensorBoard events and checkpoints, from the metrics of every rank (averaged) and its own
//! timings; a barrier ends every checkpoint; the ranks agree each iteration on whether to stop;
//! a resume continues from the checkpoint rank 0 chose, with the same world size.

use std::sync::Arc;

use anyhow::{Result, bail};

/// Collective operations between the processes of one run. Every rank must call the same
/// operations in the same order with the same sizes; an operation fails (it does not hang
/// forever) when a peer died or stopped answering, naming it where the backend can tell.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..world`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn world(&self) -> usize;
    /// The backend's name, for logs and `device-check` (`gloo`, `nccl`).
    fn backend(&self) -> String;
    /// Element-wise sum over all ranks, in place; every rank gets the same bytes.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// `root`'s bytes into every rank's `buf` (all of the same length).
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Every rank's `local` (all of the same length), concatenated in rank order.
    fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>>;
    /// Returns once every rank called it.
    fn barrier(&self) -> Result<()>;
    /// Tell the other ranks that this one failed, with why (best effort: called on the way
    /// out, so that their next operation's error names this rank and its reason).
    fn report_failure(&self, _message: &str) {}
}

/// A shared handle to the run's collective.
pub type SharedCollective = Arc<dyn Collective>;

/// (rank, world) of a run with this collective: (0, 1) for a single process.
pub fn rank_world(c: Option<&SharedCollective>) -> (usize, usize) {
    c.map_or((0, 1), |c| (c.rank(), c.world()))
}

/// Every rank's bytes, of any lengths, in rank order.
pub fn all_gather_varied(c: &dyn Collective, local: &[u8]) -> Result<Vec<Vec<u8>>> {
    let lens = c.all_gather(&(local.len() as u64).to_le_bytes())?;
    let lens: Vec<usize> = lens
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
        .collect();
    let max = lens.iter().copied().max().unwrap_or(0);
    let mut padded = local.to_vec();
    padded.resize(max, 0);
    let all = c.all_gather(&padded)?;
    Ok(lens
        .iter()
        .enumerate()
        .map(|(r, &n)| all[r * max..r * max + n].to_vec())
        .collect())
}

/// `root`'s bytes (any length) on every rank; the other ranks' `value` is ignored.
pub fn broadcast_bytes(c: &dyn Collective, value: &[u8], root: usize) -> Result<Vec<u8>> {
    let mut len = (value.len() as u64).to_le_bytes();
    c.broadcast(&mut len, root)?;
    let n = u64::from_le_bytes(len) as usize;
    let mut buf = if c.rank() == root {
        value.to_vec()
    } else {
        vec![0; n]
    };
    c.broadcast(&mut buf, root)?;
    Ok(buf)
}

/// Each rank's f64 values (the same count on every rank), by rank.
pub fn all_gather_f64(c: &dyn Collective, local: &[f64]) -> Result<Vec<Vec<f64>>> {
    let bytes: Vec<u8> = local.iter().flat_map(|v| v.to_le_bytes()).collect();
    let all = c.all_gather(&bytes)?;
    let n = local.len() * 8;
    Ok((0..c.world())
        .map(|r| {
            all[r * n..(r + 1) * n]
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect()
        })
        .collect())
}

/// Checks that every rank holds the same `value` (a digest of the weights, a count), else
/// names the ranks that differ from rank 0.
pub fn check_same(c: &dyn Collective, what: &str, value: &[u8]) -> Result<()> {
    let all = all_gather_varied(c, value)?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != all[0])
        .map(|(r, _)| r.to_string())
        .collect();
    if !differ.is_empty() {
        bail!(
            "{what} differs between ranks: rank(s) {} disagree with rank 0",
            differ.join(", ")
        );
    }
    Ok(())
}

/// One iteration's metrics as every rank sees them after [`merge_iteration`]: each metric the
/// mean over the ranks that logged it, except those a node already reduced (`global`: rank 0's
/// value); and whether any rank asked to stop (Ctrl-C, its time limit).
pub(crate) fn merge_iteration(
    c: &dyn Collective,
    row: &std::collections::BTreeMap<String, f64>,
    global: &std::collections::BTreeSet<String>,
    stop: bool,
) -> Result<(std::collections::BTreeMap<String, f64>, bool)> {
    let mut bytes = vec![stop as u8];
    bytes.extend((row.len() as u32).to_le_bytes());
    for (k, v) in row {
        bytes.push(global.contains(k) as u8);
        bytes.extend((k.len() as u32).to_le_bytes());
        bytes.extend(k.as_bytes());
        bytes.extend(v.to_le_bytes());
    }
    let all = all_gather_varied(c, &bytes)?;
    let mut any_stop = false;
    // key -> (sum, count, rank 0's value, global)
    let mut acc: std::collections::BTreeMap<String, (f64, usize, Option<f64>, bool)> =
        std::collections::BTreeMap::new();
    for (r, b) in all.iter().enumerate() {
        let bad = || anyhow::anyhow!("rank {r} sent a malformed metrics row");
        let take = |at: &mut usize, n: usize| -> Result<&[u8]> {
            let s = b.get(*at..*at + n).ok_or_else(bad)?;
            *at += n;
            Ok(s)
        };
        let mut at = 0;
        any_stop |= take(&mut at, 1)?[0] != 0;
        let n = u32::from_le_bytes(take(&mut at, 4)?.try_into()?) as usize;
        for _ in 0..n {
            let is_global = take(&mut at, 1)?[0] != 0;
            let kl = u32::from_le_bytes(take(&mut at, 4)?.try_into()?) as usize;
            let key = String::from_utf8_lossy(take(&mut at, kl)?).into_owned();
            let v = f64::from_le_bytes(take(&mut at, 8)?.try_into()?);
            let e = acc.entry(key).or_insert((0.0, 0, None, false));
            e.0 += v;
            e.1 += 1;
            if r == 0 {
                e.2 = Some(v);
            }
            e.3 |= is_global;
        }
    }
    let merged = acc
        .into_iter()
        .map(|(k, (sum, n, first, is_global))| {
            let v = match (is_global, first) {
                (true, Some(v)) => v,
                _ => sum / n as f64,
            };
            (k, v)
        })
        .collect();
    Ok((merged, any_stop))
}

/// The launcher's view of this process: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
/// `MASTER_PORT`, as torchrun, Slurm (with a wrapper) and Kubeflow's PyTorchJob set them.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchEnv {
    /// `None` when `WORLD_SIZE` is unset or 1 (a single-process run); an error naming the
    /// variable when one is missing or malformed.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        let num = |name: &str| -> Result<Option<usize>> {
            match get(name) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) => Ok(Some(n)),
                    Err(_) => {
                        bail!("environment variable {name}={v:?} is not a non-negative integer")
                    }
                },
            }
        };
        let world = match num("WORLD_SIZE")? {
            None | Some(1) => return Ok(None),
            Some(0) => bail!("environment variable WORLD_SIZE=0: a run needs at least one process"),
            Some(w) => w,
        };
        let Some(rank) = num("RANK")? else {
            bail!("WORLD_SIZE={world} is set but RANK is not (each process needs its rank)");
        };
        if rank >= world {
            bail!("RANK={rank} is not below WORLD_SIZE={world}");
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(0);
        let Some(master_addr) = get("MASTER_ADDR").filter(|s| !s.trim().is_empty()) else {
            bail!(
                "WORLD_SIZE={world} is set but MASTER_ADDR is not (rank 0's host name or address)"
            );
        };
        let port = match num("MASTER_PORT")? {
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => bail!("MASTER_PORT={p} is not a TCP port (1–65535)"),
            None => bail!(
                "WORLD_SIZE={world} is set but MASTER_PORT is not (a free port on rank 0's host)"
            ),
        };
        Ok(Some(LaunchEnv {
            rank,
            world,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port: port,
        }))
    }

    /// From the process environment.
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn should_read_the_launchers_variables_and_name_what_is_wrong() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let ok = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            ok,
            LaunchEnv {
                rank: 3,
                world: 4,
                local_rank: 1,
                master_addr: "node0".into(),
                master_port: 29500
            }
        );
        let err = |p: &[(&str, &str)]| env(p).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "two")]).contains("WORLD_SIZE=\"two\""));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("RANK=2 is not below"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1")])
                .contains("MASTER_ADDR")
        );
        assert!(
            err(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "70000")
            ])
            .contains("MASTER_PORT=70000")
        );
    }

    /// A collective of one process in memory: enough to test the helpers' framing.
    struct Solo;
    impl Collective for Solo {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            1
        }
        fn backend(&self) -> String {
            "solo".into()
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
            Ok(())
        }
        fn broadcast(&self, _: &mut [u8], _: usize) -> Result<()> {
            Ok(())
        }
        fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>> {
            Ok(local.to_vec())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn should_frame_varied_lengths_and_f64_values() {
        assert_eq!(
            all_gather_varied(&Solo, b"abc").unwrap(),
            vec![b"abc".to_vec()]
        );
        assert_eq!(broadcast_bytes(&Solo, b"xy", 0).unwrap(), b"xy".to_vec());
        assert_eq!(
            all_gather_f64(&Solo, &[1.5, -2.0]).unwrap(),
            vec![vec![1.5, -2.0]]
        );
        check_same(&Solo, "weights", b"d").unwrap();
    }
}
