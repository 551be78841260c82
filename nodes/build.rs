//! With the `tch` feature: compiles `src/model/vjp.cpp` (libtorch's backward with given output
//! gradients, which tch does not expose) and `src/dist/c10d.cpp` (libtorch's c10d: the
//! TCPStore rendezvous and the Gloo / NCCL process groups of data-parallel runs) against the
//! libtorch that torch-sys found.
//!
//! Gloo needs Gloo's own headers, which PyPI's torch wheel does not ship (Debian:
//! `apt-get install libgloo-dev`; elsewhere `GLOO_INCLUDE_DIR`). NCCL needs `nccl.h` (the
//! nvidia-nccl wheel torch depends on, or `NCCL_INCLUDE_DIR`) and the CUDA runtime's headers
//! (`CUDA_INCLUDE_DIR`, with `crt/host_config.h`). Without them the shim is built without that
//! process group, and a run that needs it says so.

fn main() {
    println!("cargo:rerun-if-changed=src/model/vjp.cpp");
    println!("cargo:rerun-if-changed=src/dist/c10d.cpp");
    for v in ["GLOO_INCLUDE_DIR", "NCCL_INCLUDE_DIR", "CUDA_INCLUDE_DIR"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    #[cfg(feature = "tch")]
    vjp_shim();
}

#[cfg(feature = "tch")]
fn vjp_shim() {
    use std::path::PathBuf;
    // torch-sys (`links = "tch"`) passes its libtorch `lib/` directory on.
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB (libtorch's lib directory)"),
    );
    let root = lib.parent().expect("libtorch lib directory has a parent");
    // PyTorch's wheels (torch >= 2.7, so 2.9.0 here) use the C++11 ABI, as does libtorch's
    // cxx11-abi download; torch-sys reads the same variable for other builds.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    torch_cc(root, &abi)
        .file("src/model/vjp.cpp")
        .compile("flowrun_vjp");
    c10d_shim(root, &abi);
}

/// A C++17 build against libtorch's headers under `root`, with its C++ ABI.
#[cfg(feature = "tch")]
fn torch_cc(root: &std::path::Path, abi: &str) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
    build
}

/// The first directory that holds `file`: the environment variable's, else the candidates.
#[cfg(feature = "tch")]
fn header_dir(
    var: &str,
    file: &str,
    candidates: &[std::path::PathBuf],
) -> Option<std::path::PathBuf> {
    std::env::var_os(var)
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(candidates.iter().cloned())
        .find(|d| d.join(file).is_file())
}

#[cfg(feature = "tch")]
fn c10d_shim(root: &std::path::Path, abi: &str) {
    use std::path::PathBuf;
    let mut build = torch_cc(root, abi);
    build.file("src/dist/c10d.cpp");
    let gloo = header_dir(
        "GLOO_INCLUDE_DIR",
        "gloo/config.h",
        &[
            PathBuf::from("/usr/include"),
            PathBuf::from("/usr/local/include"),
        ],
    );
    match &gloo {
        Some(d) => {
            build.include(d).define("USE_C10D_GLOO", None);
        }
        None => println!(
            "cargo:warning=Gloo's headers not found (apt-get install libgloo-dev, or set \
             GLOO_INCLUDE_DIR): data-parallel runs on CPU will be unavailable"
        ),
    }
    // torch's site-packages directory holds the nvidia-* wheels beside it.
    let site = root.parent().map(PathBuf::from).unwrap_or_default();
    let nccl = header_dir(
        "NCCL_INCLUDE_DIR",
        "nccl.h",
        &[site.join("nvidia/nccl/include")],
    );
    let cuda = header_dir(
        "CUDA_INCLUDE_DIR",
        "crt/host_config.h",
        &[
            site.join("nvidia/cuda_nvcc/include"),
            site.join("nvidia/cuda_runtime/include"),
            PathBuf::from("/usr/local/cuda/include"),
        ],
    );
    // ProcessGroupNCCL.hpp pulls in the CUDA runtime's headers, and through them CCCL's.
    let cuda = cuda.filter(|c| c.join("nv/target").is_file());
    if let (Some(n), Some(c)) = (&nccl, &cuda) {
        build
            .include(n)
            .include(c)
            .include(site.join("nvidia/cuda_runtime/include"))
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None);
    }
    build.compile("flowrun_c10d");
}
