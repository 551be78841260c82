//! The run directory on disk: one writer at a time (a lock), checkpoints that verify
//! (checksums), what a resume may continue from, and metric rows that are whole or absent.
//!
//! ```text
//! runs/<name>-<stamp>/
//!   .lock                      held (flock) by the process running it; holds its PID
//!   pipeline.yaml run.json log.jsonl metrics.jsonl metrics.superseded.jsonl
//!   checkpoints/latest         names the newest complete checkpoint
//!   checkpoints/iter-000020/   state.json, resources/<name>/…, SHA256SUMS
//!   checkpoints/_superseded/   checkpoints after the one a resume continued from
//! ```
//! Nothing a run wrote is deleted by a resume: what comes after the checkpoint it continues
//! from moves aside (`_superseded/`, `metrics.superseded.jsonl`); only the rotation of
//! checkpoints older than the newest `keep_checkpoints` deletes.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";
/// The state file of a checkpoint (iteration and node states).
pub const STATE_FILE: &str = "state.json";
/// The checksum list of a checkpoint, in `sha256sum` format (`sha256sum -c SHA256SUMS` checks
/// it by hand).
pub const SUMS_FILE: &str = "SHA256SUMS";
/// The file naming the newest complete checkpoint.
pub const LATEST: &str = "latest";
/// Where a resume moves checkpoints of iterations after the one it continues from.
pub const SUPERSEDED: &str = "_superseded";
/// `state.json`'s `format` from which every checkpoint has a [`SUMS_FILE`].
pub const CHECKSUMMED_FORMAT: u64 = 2;

/// An exclusive, advisory lock on a run directory, held for the life of the run. The kernel
/// releases it when the process exits in any way (kill -9 included), so a lock file left by a
/// dead process is simply taken over.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Lock `run_dir` for this process, or fail at once naming the process that holds it.
pub fn lock(run_dir: &Path) -> Result<RunLock> {
    let path = run_dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let pid = holder
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok());
            let who = pid.map_or_else(|| "another process".to_string(), |p| format!("process {p}"));
            bail!(
                "run directory {} is in use by {who}: one process at a time may run or resume it \
                 (wait for it to finish, or stop it first)",
                run_dir.display()
            );
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    let stamp = chrono::Local::now().to_rfc3339();
    let written = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}\n{stamp}", std::process::id()))
        .and_then(|()| file.flush());
    written.with_context(|| format!("cannot write {}", path.display()))?;
    Ok(RunLock { _file: file })
}

/// `iter-000123` → 123; anything else (`..`, `iter-12x`, a path) → None.
pub fn checkpoint_iteration(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("iter-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The directory name of the checkpoint of iteration `it`.
pub fn checkpoint_name(it: u64) -> String {
    format!("iter-{it:06}")
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

/// Every regular file under `dir`, as `/`-separated paths relative to it, sorted.
fn files_under(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
        let d = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for e in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ty = e.file_type()?;
            if ty.is_dir() {
                walk(root, &r, out)?;
            } else if ty.is_file() {
                out.push(r);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Write [`SUMS_FILE`] into a checkpoint directory being written: the SHA-256 of every file in
/// it. Call last, once every other file is complete.
pub fn write_checksums(dir: &Path) -> Result<()> {
    let mut text = String::new();
    for rel in files_under(dir)? {
        if rel == SUMS_FILE {
            continue;
        }
        text.push_str(&format!("{}  {rel}\n", sha256_file(&dir.join(&rel))?));
    }
    crate::fsutil::write_atomic(&dir.join(SUMS_FILE), text.as_bytes())
}

/// What [`verify`] found in a sound checkpoint.
#[derive(Debug, Clone)]
pub struct Verified {
    pub dir: PathBuf,
    pub iteration: u64,
    /// Written by a flowrun from before checksums: its files could not be verified.
    pub unchecked: bool,
}

/// Check a checkpoint directory: its state parses, and every file listed in [`SUMS_FILE`]
/// exists with that checksum. The error names the first file at fault.
pub fn verify(dir: &Path) -> Result<Verified> {
    let state_path = dir.join(STATE_FILE);
    let sums_path = dir.join(SUMS_FILE);
    if !dir.is_dir() {
        bail!("{} does not exist", dir.display());
    }
    let sums = match fs::read_to_string(&sums_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", sums_path.display())),
    };
    if let Some(sums) = &sums {
        let mut listed_state = false;
        for (i, line) in sums.lines().enumerate() {
            let Some((want, rel)) = line.split_once("  ") else {
                bail!(
                    "{} line {} is not `<sha256>  <file>`: the checksum list is damaged",
                    sums_path.display(),
                    i + 1
                );
            };
            if want.len() != 64
                || !want.bytes().all(|b| b.is_ascii_hexdigit())
                || rel
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
            {
                bail!(
                    "{} line {} is not `<sha256>  <file>`: the checksum list is damaged",
                    sums_path.display(),
                    i + 1
                );
            }
            let path = dir.join(rel);
            if !path.is_file() {
                bail!("{} is missing (listed in {SUMS_FILE})", path.display());
            }
            if sha256_file(&path)? != want {
                bail!(
                    "{} is damaged: its SHA-256 differs from the one recorded in {SUMS_FILE} when it was written",
                    path.display()
                );
            }
            listed_state |= rel == STATE_FILE;
        }
        if !listed_state {
            bail!(
                "{} does not list {STATE_FILE}: the checksum list is damaged",
                sums_path.display()
            );
        }
    }
    let text = fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{} is not valid JSON ({e})", state_path.display()))?;
    let iteration = state["iteration"]
        .as_u64()
        .ok_or_else(|| anyhow!("{} has no `iteration`", state_path.display()))?;
    let format = state["format"].as_u64().unwrap_or(1);
    if sums.is_none() && format >= CHECKSUMMED_FORMAT {
        bail!("{} is missing", sums_path.display());
    }
    Ok(Verified {
        dir: dir.to_path_buf(),
        iteration,
        unchecked: sums.is_none(),
    })
}

/// When `path` lies inside a run's checkpoint (`…/checkpoints/iter-NNNNNN/…`), verify that
/// checkpoint: a file taken out of a damaged one is refused, naming the damage.
pub fn verify_enclosing_checkpoint(path: &Path) -> Result<Option<Verified>> {
    for dir in path.ancestors() {
        let is_checkpoint = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(checkpoint_iteration)
            .is_some()
            && dir.join(STATE_FILE).is_file();
        if is_checkpoint {
            return verify(dir).map(Some);
        }
    }
    Ok(None)
}

/// The checkpoint directories of a run, newest first, with their iterations.
fn checkpoints_newest_first(ckdir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = fs::read_dir(ckdir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            checkpoint_iteration(&name).map(|it| (it, e.path()))
        })
        .filter(|(_, p)| p.is_dir())
        .collect();
    v.sort_by_key(|(it, _)| std::cmp::Reverse(*it));
    v
}

/// Where a resume continues from.
#[derive(Debug)]
pub struct ResumePoint {
    /// The checkpoint, or None: the run never wrote one, so it starts again from iteration 1.
    pub checkpoint: Option<Verified>,
    /// What is worth telling the user (a damaged `latest`, a checkpoint passed over).
    pub warnings: Vec<String>,
}

/// The checkpoint `latest` names if it verifies, else the newest one that does (with a
/// warning saying why). An error when checkpoints exist and none verifies: starting again
/// from scratch would overwrite what the run wrote.
pub fn resume_point(run_dir: &Path) -> Result<ResumePoint> {
    let ckdir = run_dir.join("checkpoints");
    let mut warnings = Vec::new();
    let mut rejected: Vec<String> = Vec::new();
    let latest_path = ckdir.join(LATEST);
    let named = fs::read(&latest_path).ok().map(|b| {
        let s = String::from_utf8_lossy(&b).trim().to_string();
        s.chars().take(80).collect::<String>()
    });
    let candidates = checkpoints_newest_first(&ckdir);
    match &named {
        Some(name) => match checkpoint_iteration(name) {
            Some(_) => match verify(&ckdir.join(name)) {
                Ok(v) => {
                    return Ok(ResumePoint {
                        checkpoint: Some(v),
                        warnings,
                    });
                }
                Err(e) => rejected.push(format!("{name}: {e:#}")),
            },
            None => warnings.push(format!(
                "{} names `{name}`, which is not a checkpoint name (iter-NNNNNN)",
                latest_path.display()
            )),
        },
        None if !candidates.is_empty() => warnings.push(format!(
            "{} is missing or unreadable",
            latest_path.display()
        )),
        None => {}
    }
    for (_, dir) in &candidates {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if named.as_deref() == Some(name.as_str()) {
            continue; // already tried
        }
        match verify(dir) {
            Ok(v) => {
                for r in &rejected {
                    warnings.push(format!("checkpoint {r}"));
                }
                warnings.push(format!(
                    "resuming from {name}, the newest checkpoint that verifies"
                ));
                return Ok(ResumePoint {
                    checkpoint: Some(v),
                    warnings,
                });
            }
            Err(e) => rejected.push(format!("{name}: {e:#}")),
        }
    }
    if rejected.is_empty() {
        // Never checkpointed (killed before the first one): start again from iteration 1.
        return Ok(ResumePoint {
            checkpoint: None,
            warnings,
        });
    }
    let mut msg = format!("no checkpoint of {} verifies:", run_dir.display());
    for r in &rejected {
        msg.push_str(&format!("\n  {r}"));
    }
    msg.push_str(&format!(
        "\nnothing was changed; to train again from the first iteration, start a new run: flowrun run {}",
        run_dir.join("pipeline.yaml").display()
    ));
    Err(anyhow!(msg))
}

/// The newest checkpoint of a run that verifies (for advice after a failure), if any.
pub fn newest_verified(run_dir: &Path) -> Option<Verified> {
    resume_point(run_dir).ok().and_then(|r| r.checkpoint)
}

/// A name for `name` inside `dir` that is not taken: `name`, else `stem.2.ext`, `stem.3.ext`,
/// … (the extension stays last, so `iter-000005.2.parquet` still opens as Parquet).
pub fn free_name(dir: &Path, name: &str) -> PathBuf {
    let (stem, ext) = match name.split_once('.') {
        Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
        _ => (name, String::new()),
    };
    let mut p = dir.join(name);
    let mut n = 2;
    while p.exists() {
        p = dir.join(format!("{stem}.{n}{ext}"));
        n += 1;
    }
    p
}

/// Move `path` into `dir` (created if needed) under a name not yet taken there; returns the
/// new path.
pub fn move_aside(path: &Path, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dest = free_name(dir, &name);
    fs::rename(path, &dest)
        .with_context(|| format!("cannot move {} to {}", path.display(), dest.display()))?;
    Ok(dest)
}

/// Move the checkpoints of iterations after `it` to `checkpoints/_superseded/`: the resume
/// writes them again. Returns how many moved.
pub fn supersede_checkpoints_after(run_dir: &Path, it: u64) -> Result<usize> {
    let ckdir = run_dir.join("checkpoints");
    let sup = ckdir.join(SUPERSEDED);
    let mut moved = 0;
    for (ck_it, dir) in checkpoints_newest_first(&ckdir) {
        if ck_it > it {
            move_aside(&dir, &sup)?;
            moved += 1;
        }
    }
    if moved > 0 {
        crate::fsutil::sync_dir(&ckdir);
    }
    Ok(moved)
}

/// Delete all but the newest `keep` checkpoints of iterations up to `latest_it` (never the
/// newest one itself).
pub fn prune_checkpoints(ckdir: &Path, keep: usize, latest_it: u64) {
    let older: Vec<(u64, PathBuf)> = checkpoints_newest_first(ckdir)
        .into_iter()
        .filter(|(it, _)| *it <= latest_it)
        .collect();
    for (it, dir) in older.into_iter().skip(keep.max(1)) {
        if it != latest_it {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Append one line to a JSON Lines file so that it is either there whole or not at all: on a
/// failed write the file is cut back to where it was. The error names the file and `what`.
pub fn append_line(file: &mut File, path: &Path, line: &str, what: &str) -> Result<()> {
    let before = file
        .metadata()
        .with_context(|| format!("cannot read the size of {}", path.display()))?
        .len();
    let mut bytes = line.as_bytes().to_vec();
    if !bytes.ends_with(b"\n") {
        bytes.push(b'\n');
    }
    let written = file.write_all(&bytes).and_then(|()| file.flush());
    if let Err(e) = written {
        let restored = file.set_len(before);
        let mut msg = format!("cannot append {what} to {}: {e}", path.display());
        if restored.is_err() {
            msg.push_str(" (and cannot cut off the partial line)");
        } else {
            msg.push_str(" (the file is as it was before)");
        }
        bail!(msg);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowrun-rundir-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn checkpoint(run: &Path, it: u64) -> PathBuf {
        let d = run.join("checkpoints").join(checkpoint_name(it));
        fs::create_dir_all(d.join("resources/m")).unwrap();
        fs::write(d.join("resources/m/w.bin"), vec![7u8; 4096]).unwrap();
        fs::write(
            d.join(STATE_FILE),
            format!("{{\"format\": 2, \"iteration\": {it}}}"),
        )
        .unwrap();
        write_checksums(&d).unwrap();
        fs::write(run.join("checkpoints").join(LATEST), checkpoint_name(it)).unwrap();
        d
    }

    #[test]
    fn should_detect_one_flipped_bit_and_name_the_file() {
        let run = tmp("flip");
        let d = checkpoint(&run, 3);
        assert_eq!(verify(&d).unwrap().iteration, 3);
        let w = d.join("resources/m/w.bin");
        let mut bytes = fs::read(&w).unwrap();
        bytes[1234] ^= 0x10;
        fs::write(&w, bytes).unwrap();
        let e = format!("{:#}", verify(&d).unwrap_err());
        assert!(e.contains("resources/m/w.bin is damaged"), "{e}");
        fs::remove_dir_all(run).unwrap();
    }

    #[test]
    fn should_fall_back_to_the_newest_checkpoint_that_verifies() {
        let run = tmp("fallback");
        checkpoint(&run, 1);
        checkpoint(&run, 2);
        let ckdir = run.join("checkpoints");
        for bad in ["iter-000099", "../../etc", "", "iter-000002"] {
            if bad == "iter-000002" {
                fs::write(ckdir.join("iter-000002").join(STATE_FILE), b"{\"iter").unwrap();
                fs::write(ckdir.join(LATEST), bad).unwrap();
            } else {
                fs::write(ckdir.join(LATEST), bad).unwrap();
            }
            let r = resume_point(&run).unwrap();
            let ck = r.checkpoint.expect("a checkpoint verifies");
            let want = if bad == "iter-000002" { 1 } else { 2 };
            assert_eq!(ck.iteration, want, "latest = {bad:?}");
            assert!(
                r.warnings
                    .iter()
                    .any(|w| w.contains("newest checkpoint that verifies")),
                "{:?}",
                r.warnings
            );
        }
        // None verifies: refuse, naming each.
        fs::write(ckdir.join("iter-000001/resources/m/w.bin"), b"short").unwrap();
        let e = format!("{:#}", resume_point(&run).unwrap_err());
        assert!(
            e.contains("no checkpoint") && e.contains("iter-000001"),
            "{e}"
        );
        fs::remove_dir_all(run).unwrap();
    }

    #[test]
    fn should_refuse_a_second_lock_naming_the_holder() {
        let run = tmp("lock");
        let held = lock(&run).unwrap();
        let e = format!("{:#}", lock(&run).unwrap_err());
        assert!(
            e.contains(&format!("in use by process {}", std::process::id())),
            "{e}"
        );
        drop(held);
        lock(&run).expect("released with its holder");
        fs::remove_dir_all(run).unwrap();
    }

    #[test]
    fn should_move_later_checkpoints_aside_and_prune_only_older_ones() {
        let run = tmp("prune");
        for it in 1..=4 {
            checkpoint(&run, it);
        }
        let ckdir = run.join("checkpoints");
        assert_eq!(supersede_checkpoints_after(&run, 2).unwrap(), 2);
        assert!(ckdir.join("_superseded/iter-000004").is_dir());
        checkpoint(&run, 4);
        assert_eq!(supersede_checkpoints_after(&run, 2).unwrap(), 1);
        assert!(ckdir.join("_superseded/iter-000004.2").is_dir());
        prune_checkpoints(&ckdir, 1, 2);
        assert!(!ckdir.join("iter-000001").exists());
        assert!(ckdir.join("iter-000002").is_dir());
        fs::remove_dir_all(run).unwrap();
    }

    #[test]
    fn should_leave_no_partial_line_when_an_append_fails() {
        let run = tmp("append");
        let path = run.join("m.jsonl");
        fs::write(&path, "{\"iteration\":1}\n").unwrap();
        // A read-only handle: every write fails, like a full disk.
        let mut ro = File::open(&path).unwrap();
        let e = format!(
            "{:#}",
            append_line(&mut ro, &path, "{\"iteration\":2}", "iteration 2's metrics").unwrap_err()
        );
        assert!(
            e.contains("m.jsonl") && e.contains("iteration 2's metrics"),
            "{e}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"iteration\":1}\n");
        fs::remove_dir_all(run).unwrap();
    }
}
