//! With `--features tch`, embed the libtorch library directory as an rpath so the binary runs
//! without LD_LIBRARY_PATH. The directory is taken from `LIBTORCH` (its `lib/`) or, with
//! `LIBTORCH_USE_PYTORCH=1`, from the `python3` on PATH (`torch/lib`), as torch-sys does.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    let dir = if let Some(root) = std::env::var_os("LIBTORCH") {
        Some(PathBuf::from(root).join("lib"))
    } else {
        Command::new("python3")
            .args([
                "-c",
                "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    match dir {
        Some(d) if d.exists() => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", d.display());
        }
        _ => println!(
            "cargo:warning=libtorch's lib/ not found: the flowrun binary will need LD_LIBRARY_PATH pointing at it"
        ),
    }
}
