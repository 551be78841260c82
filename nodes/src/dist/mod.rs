//! The process group of a data-parallel run: libtorch's c10d (`c10d.cpp`), the engine torchrun
//! itself uses. Ranks meet at a `TCPStore` on `MASTER_ADDR:MASTER_PORT` (rank 0 hosts it) and
//! run their collectives on Gloo (CPU memory: flex and libtorch CPU, and CUDA runs in a build
//! without NCCL) or NCCL (libtorch CUDA, when built with its headers).
//!
//! Why c10d and not MPI or NCCL alone: it is what the launchers users already have (torchrun,
//! Slurm with a wrapper, Kubeflow's PyTorchJob) rendezvous with, through the same five
//! variables; it covers CPU and GPU behind one interface; and the libtorch flowrun already
//! links ships it. The engine sees only [`runner::Collective`], so another backend (MPI through
//! the `mpi` crate, NCCL through `cudarc`) can be added beside it.
//!
//! Failures are bounded: every operation waits at most the timeout (`FLOWRUN_DIST_TIMEOUT_S`,
//! 300 s by default), a peer that exits closes its connections (the others fail at once), and
//! each rank ticks a heartbeat counter in the store every half second on its own connection,
//! so a failed operation can name the rank that stopped (or the reason it reported).

use anyhow::Result;
use runner::{LaunchEnv, SharedCollective};

/// The timeout of every collective operation and of the rendezvous, in seconds.
pub fn timeout_s() -> Result<f64> {
    match std::env::var("FLOWRUN_DIST_TIMEOUT_S") {
        Err(_) => Ok(300.0),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
            _ => anyhow::bail!(
                "environment variable FLOWRUN_DIST_TIMEOUT_S={v:?} is not a positive number of seconds"
            ),
        },
    }
}

/// Which process group a device's collectives use, in this build.
pub fn backend_for(device: &str) -> Result<&'static str> {
    let cuda = device.starts_with("libtorch-cuda");
    #[cfg(feature = "tch")]
    {
        let have = c10d::backends();
        if cuda && have & 2 != 0 {
            return Ok("nccl");
        }
        if have & 1 != 0 {
            return Ok("gloo");
        }
        anyhow::bail!(
            "this flowrun was built without Gloo's headers, so it has no process group for \
             data-parallel runs: install them (Debian: apt-get install libgloo-dev) and rebuild \
             with --features tch"
        )
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = cuda;
        anyhow::bail!(
            "data-parallel runs (WORLD_SIZE > 1) use libtorch's c10d, but this flowrun was built \
             without libtorch: rebuild with `cargo build --release --features tch` (README, \
             \"Many devices\")"
        )
    }
}

/// Join the run's process group as `env` says (blocks until every rank arrived, or the
/// timeout).
pub fn connect(env: &LaunchEnv, device: &str) -> Result<SharedCollective> {
    let backend = backend_for(device)?;
    #[cfg(feature = "tch")]
    {
        let gpu = match crate::device::parse_device(device) {
            Ok(crate::device::DeviceKind::LibTorchCuda(i)) => i,
            _ => 0,
        };
        Ok(std::sync::Arc::new(c10d::C10d::connect(
            env,
            backend,
            gpu,
            timeout_s()?,
        )?))
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = (env, backend);
        unreachable!("backend_for fails without libtorch")
    }
}

#[cfg(feature = "tch")]
mod c10d {
    use std::ffi::{CStr, CString, c_char, c_int, c_void};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use anyhow::{Result, anyhow, bail};
    use runner::{Collective, LaunchEnv};

    unsafe extern "C" {
        fn flowrun_c10d_backends() -> c_int;
        #[allow(clippy::too_many_arguments)]
        fn flowrun_c10d_connect(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            server: c_int,
            backend: c_int,
            cuda_device: c_int,
            timeout_ms: i64,
            prefix: *const c_char,
            store_only: c_int,
            out: *mut *mut c_void,
        ) -> *const c_char;
        fn flowrun_c10d_free(group: *mut c_void);
        fn flowrun_c10d_allreduce_f32(group: *mut c_void, data: *mut f32, n: i64) -> *const c_char;
        fn flowrun_c10d_broadcast_u8(
            group: *mut c_void,
            data: *mut u8,
            n: i64,
            root: c_int,
        ) -> *const c_char;
        fn flowrun_c10d_allgather_u8(
            group: *mut c_void,
            data: *const u8,
            n: i64,
            out: *mut u8,
            world: c_int,
        ) -> *const c_char;
        fn flowrun_c10d_barrier(group: *mut c_void) -> *const c_char;
        fn flowrun_c10d_store_set(
            group: *mut c_void,
            key: *const c_char,
            value: *const u8,
            n: i64,
        ) -> *const c_char;
        fn flowrun_c10d_store_try_get(
            group: *mut c_void,
            key: *const c_char,
            out: *mut u8,
            cap: i64,
            len: *mut i64,
            found: *mut c_int,
        ) -> *const c_char;
        fn flowrun_c10d_store_add(
            group: *mut c_void,
            key: *const c_char,
            delta: i64,
            value: *mut i64,
        ) -> *const c_char;
    }

    /// Bit 0: Gloo, bit 1: NCCL.
    pub fn backends() -> i32 {
        // SAFETY: a pure function of how the shim was compiled.
        unsafe { flowrun_c10d_backends() }
    }

    /// The shim's error text, if any.
    fn check(err: *const c_char) -> std::result::Result<(), String> {
        if err.is_null() {
            Ok(())
        } else {
            // SAFETY: a NUL-terminated string in the shim's thread-local buffer, copied at once.
            Err(unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned())
        }
    }

    /// A `Group*` of the shim (the store, and the process group unless store-only).
    struct Handle(*mut c_void);
    // SAFETY: c10d's stores and process groups are used from any thread (torch does so); the
    // heartbeat's handle is only used under its mutex, the main one by the run's one caller
    // at a time (collectives are issued in program order).
    unsafe impl Send for Handle {}
    unsafe impl Sync for Handle {}
    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: allocated by flowrun_c10d_connect, freed once.
            unsafe { flowrun_c10d_free(self.0) }
        }
    }

    fn open(
        env: &LaunchEnv,
        backend: &str,
        gpu: usize,
        timeout: Duration,
        server: bool,
        store_only: bool,
    ) -> Result<Handle> {
        let host = CString::new(env.master_addr.clone())?;
        let prefix = CString::new("flowrun/")?;
        let mut out = std::ptr::null_mut();
        // SAFETY: valid C strings and an out pointer; the shim copies what it keeps.
        let err = unsafe {
            flowrun_c10d_connect(
                host.as_ptr(),
                env.master_port as c_int,
                env.rank as c_int,
                env.world as c_int,
                server as c_int,
                (backend == "nccl") as c_int,
                gpu as c_int,
                timeout.as_millis() as i64,
                prefix.as_ptr(),
                store_only as c_int,
                &mut out,
            )
        };
        check(err).map_err(|e| {
            anyhow!(
                "rank {} of {} cannot join the process group at {}:{} ({backend}): {e}",
                env.rank,
                env.world,
                env.master_addr,
                env.master_port
            )
        })?;
        Ok(Handle(out))
    }

    /// c10d's TCPStore + a Gloo or NCCL process group, with a heartbeat.
    pub struct C10d {
        group: Handle,
        /// A second store connection: the heartbeat ticks and failure reports.
        side: Arc<Mutex<Handle>>,
        env: LaunchEnv,
        backend: &'static str,
        stop: Arc<AtomicBool>,
        heartbeat: Option<std::thread::JoinHandle<()>>,
    }

    const TICK: Duration = Duration::from_millis(500);

    impl C10d {
        pub fn connect(
            env: &LaunchEnv,
            backend: &'static str,
            gpu: usize,
            timeout_s: f64,
        ) -> Result<C10d> {
            let timeout = Duration::from_secs_f64(timeout_s);
            // Rank 0 hosts the store; the process group's rendezvous runs through it.
            let group = open(env, backend, gpu, timeout, env.rank == 0, false)?;
            let side = Arc::new(Mutex::new(open(env, backend, gpu, timeout, false, true)?));
            let stop = Arc::new(AtomicBool::new(false));
            let key = CString::new(format!("heartbeat/{}", env.rank))?;
            let heartbeat = {
                let (side, stop) = (side.clone(), stop.clone());
                std::thread::Builder::new()
                    .name("flowrun-heartbeat".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok(h) = side.lock() {
                                let mut v = 0;
                                // SAFETY: a live handle under its mutex; errors are ignored (the
                                // store's host may be gone: the next collective says so).
                                let _ =
                                    unsafe { flowrun_c10d_store_add(h.0, key.as_ptr(), 1, &mut v) };
                            }
                            std::thread::sleep(TICK);
                        }
                    })?
            };
            Ok(C10d {
                group,
                side,
                env: env.clone(),
                backend,
                stop,
                heartbeat: Some(heartbeat),
            })
        }

        /// A store value, if the key exists (never waits).
        fn try_get(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, String> {
            let h = self.side.lock().map_err(|_| "heartbeat lock poisoned")?;
            let k = CString::new(key).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 4096];
            let (mut len, mut found) = (0i64, 0 as c_int);
            // SAFETY: a live handle; `buf` holds `cap` bytes.
            check(unsafe {
                flowrun_c10d_store_try_get(
                    h.0,
                    k.as_ptr(),
                    buf.as_mut_ptr(),
                    buf.len() as i64,
                    &mut len,
                    &mut found,
                )
            })?;
            if found == 0 {
                return Ok(None);
            }
            buf.truncate((len as usize).min(4096));
            Ok(Some(buf))
        }

        fn heartbeats(&self) -> std::result::Result<Vec<i64>, String> {
            (0..self.env.world)
                .map(|r| {
                    Ok(self
                        .try_get(&format!("heartbeat/{r}"))?
                        .and_then(|v| String::from_utf8_lossy(&v).trim().parse().ok())
                        .unwrap_or(-1))
                })
                .collect()
        }

        /// Why an operation failed, as far as the store can tell: the ranks that reported a
        /// failure, else the ranks whose heartbeat stopped, else rank 0's store being gone.
        fn diagnose(&self) -> String {
            let me = self.env.rank;
            let mut failed = Vec::new();
            for r in (0..self.env.world).filter(|&r| r != me) {
                match self.try_get(&format!("failed/{r}")) {
                    Ok(Some(msg)) => failed.push(format!(
                        "rank {r} failed: {}",
                        String::from_utf8_lossy(&msg)
                    )),
                    Ok(None) => {}
                    Err(_) => {
                        return format!(
                            "rank 0 is unreachable (its store at {}:{} does not answer): it \
                             died or its host is down",
                            self.env.master_addr, self.env.master_port
                        );
                    }
                }
            }
            if !failed.is_empty() {
                return failed.join("; ");
            }
            let Ok(before) = self.heartbeats() else {
                return format!(
                    "rank 0 is unreachable (its store at {}:{} does not answer)",
                    self.env.master_addr, self.env.master_port
                );
            };
            std::thread::sleep(TICK * 5);
            let Ok(after) = self.heartbeats() else {
                return "rank 0 is unreachable (its store stopped answering)".into();
            };
            let stopped: Vec<String> = (0..self.env.world)
                .filter(|&r| r != me && after[r] <= before[r])
                .map(|r| r.to_string())
                .collect();
            if stopped.is_empty() {
                "every rank is still alive: a rank may be stuck in a different operation (a \
                 pipeline that differs between ranks?) or the network is down"
                    .into()
            } else {
                format!(
                    "rank(s) {} stopped answering (no heartbeat for {:.1} s): killed, crashed or hung",
                    stopped.join(", "),
                    (TICK * 5).as_secs_f64()
                )
            }
        }

        fn op(&self, what: &str, err: *const c_char) -> Result<()> {
            if let Err(e) = check(err) {
                let why = self.diagnose();
                bail!(
                    "collective {what} failed on rank {} of {} ({}): {why}. ({e})",
                    self.env.rank,
                    self.env.world,
                    self.backend
                );
            }
            Ok(())
        }
    }

    impl Drop for C10d {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(h) = self.heartbeat.take() {
                let _ = h.join();
            }
        }
    }

    impl Collective for C10d {
        fn rank(&self) -> usize {
            self.env.rank
        }
        fn world(&self) -> usize {
            self.env.world
        }
        fn backend(&self) -> String {
            self.backend.to_string()
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            // SAFETY: `buf` is valid for its length; the shim writes the sum into it.
            let e = unsafe {
                flowrun_c10d_allreduce_f32(self.group.0, buf.as_mut_ptr(), buf.len() as i64)
            };
            self.op("all-reduce", e)
        }
        fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
            // SAFETY: as above.
            let e = unsafe {
                flowrun_c10d_broadcast_u8(
                    self.group.0,
                    buf.as_mut_ptr(),
                    buf.len() as i64,
                    root as c_int,
                )
            };
            self.op("broadcast", e)
        }
        fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>> {
            let mut out = vec![0u8; local.len() * self.env.world];
            // SAFETY: `local` is read, `out` holds world × len bytes.
            let e = unsafe {
                flowrun_c10d_allgather_u8(
                    self.group.0,
                    local.as_ptr(),
                    local.len() as i64,
                    out.as_mut_ptr(),
                    self.env.world as c_int,
                )
            };
            self.op("all-gather", e)?;
            Ok(out)
        }
        fn barrier(&self) -> Result<()> {
            // SAFETY: a live handle.
            let e = unsafe { flowrun_c10d_barrier(self.group.0) };
            self.op("barrier", e)
        }
        fn report_failure(&self, message: &str) {
            let mut msg = message.to_string();
            msg.truncate(2000);
            if let (Ok(h), Ok(k)) = (
                self.side.lock(),
                CString::new(format!("failed/{}", self.env.rank)),
            ) {
                // SAFETY: a live handle and a valid key; the value is copied.
                let _ = unsafe {
                    flowrun_c10d_store_set(h.0, k.as_ptr(), msg.as_ptr(), msg.len() as i64)
                };
            }
        }
    }
}

/// A node type that does not run data-parallel yet refuses a run of several processes when
/// it is built, before the first iteration.
pub fn single_process_only(node_type: &str, world: usize) -> Result<()> {
    if world > 1 {
        anyhow::bail!(
            "`{node_type}` does not run data-parallel yet: run this pipeline in one process \
             (WORLD_SIZE={world} here)"
        );
    }
    Ok(())
}

/// This rank's rows of draws made for the whole global batch. `draw(n)` makes `n` values:
/// here for all `world × b` samples of `per_sample` values each, in sample order, of which this
/// rank keeps rows `[rank·b, (rank+1)·b)`. In a single process that is all of them, so the
/// draws of every sample are the same however the batch is split across ranks.
pub fn shard_rows<T>(
    rank: usize,
    world: usize,
    b: usize,
    per_sample: usize,
    draw: impl FnOnce(usize) -> Vec<T>,
) -> Vec<T> {
    let all = draw(world * b * per_sample);
    if world <= 1 {
        return all;
    }
    all.into_iter()
        .skip(rank * b * per_sample)
        .take(b * per_sample)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_give_each_rank_its_rows_of_the_global_draws() {
        let draw = |n: usize| (0..n as u32).collect::<Vec<_>>();
        assert_eq!(shard_rows(0, 1, 3, 2, draw), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(shard_rows(0, 2, 2, 2, draw), vec![0, 1, 2, 3]);
        assert_eq!(shard_rows(1, 2, 2, 2, draw), vec![4, 5, 6, 7]);
        let whole: Vec<u32> = (0..3).flat_map(|r| shard_rows(r, 3, 2, 1, draw)).collect();
        assert_eq!(whole, draw(6));
    }
}
