//! Crash-safe file writing: write to a hidden temporary in the same directory, fsync, rename.
//! A reader (or a resumed run) sees either the old file or the new one, never half of one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// A hidden temporary name for `path` (`.name.tmp-<pid>-<n>` in the same directory, unique
/// within the process so concurrent writers never share one): not matched by
/// `*.parquet`-style globs, and removed by [`clean_temporaries`].
pub fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| {
        f.write_all(bytes)?;
        Ok(())
    })
}

/// Create `path` atomically, filling it through `fill`.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")));
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Read at most `cap` bytes of `path`; `None` when it holds more (its metadata is not trusted:
/// `/dev/zero` and pipes report a size of 0).
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path)?.take(cap + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= cap).then_some(bytes))
}

/// fsync a directory so a rename inside it is durable (best effort).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Remove leftover hidden temporaries (`.*.tmp-*`, `.tmp-*`) from `dir`; returns how many.
pub fn clean_temporaries(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp") || name.starts_with(".tmp-") {
            let p = e.path();
            let ok = if p.is_dir() {
                fs::remove_dir_all(&p).is_ok()
            } else {
                fs::remove_file(&p).is_ok()
            };
            n += ok as usize;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_replace_files_atomically_and_clean_leftovers() {
        let dir = std::env::temp_dir().join(format!("flowrun-fsutil-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        fs::write(dir.join(".b.parquet.tmp-123"), b"partial").unwrap();
        assert_eq!(clean_temporaries(&dir), 1);
        assert!(p.exists());
        // A failing fill leaves the old file intact and no temporary.
        let r = write_atomic_with(&p, |_| anyhow::bail!("boom"));
        assert!(r.is_err());
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(clean_temporaries(&dir), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
