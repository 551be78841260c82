//! With the `tch` feature: compiles `src/model/vjp.cpp` (libtorch's backward with given output
//! gradients, which tch does not expose) against the libtorch that torch-sys found.

fn main() {
    println!("cargo:rerun-if-changed=src/model/vjp.cpp");
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
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("src/model/vjp.cpp")
        .compile("flowrun_vjp");
}
