//! The `device` of a pipeline: which burn backend runs the tensors.
//!
//! `flex` (default) is burn's pure-Rust CPU backend. `libtorch` and `libtorch-cuda:N` run on
//! libtorch through burn-tch; they need a binary built with `--features tch`.

use burn::tensor::Device;

/// A parsed device name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Flex,
    LibTorch,
    LibTorchCuda(usize),
}

/// Parse a device name, checking that this binary can run it.
pub fn parse_device(s: &str) -> Result<DeviceKind, String> {
    let kind = match s {
        "flex" => DeviceKind::Flex,
        "libtorch" | "libtorch-cpu" => DeviceKind::LibTorch,
        other => match other.strip_prefix("libtorch-cuda") {
            Some("") => DeviceKind::LibTorchCuda(0),
            Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse().ok()) {
                Some(i) => DeviceKind::LibTorchCuda(i),
                None => {
                    return Err(format!(
                        "invalid device `{s}`: write `libtorch-cuda:N` with N the GPU index"
                    ));
                }
            },
            None => {
                return Err(format!(
                    "unknown device `{s}`: use `flex` (pure-Rust CPU), `libtorch` (CPU) or `libtorch-cuda:N`"
                ));
            }
        },
    };
    if kind != DeviceKind::Flex && !cfg!(feature = "tch") {
        return Err(format!(
            "device `{s}` needs libtorch, but this flowrun was built without it; rebuild with `cargo build --release --features tch` (see README, \"Running on libtorch\")"
        ));
    }
    Ok(kind)
}

/// The burn device for inference (no autodiff). burn marks burn-tch deprecated in 0.22 (it is
/// the last release with it); we use it on purpose for libtorch CPU/CUDA.
#[allow(deprecated)]
pub fn device(kind: DeviceKind) -> Device {
    match kind {
        DeviceKind::Flex => Device::flex(),
        #[cfg(feature = "tch")]
        DeviceKind::LibTorch => Device::libtorch(),
        #[cfg(feature = "tch")]
        DeviceKind::LibTorchCuda(i) => Device::libtorch_cuda(i),
        #[cfg(not(feature = "tch"))]
        _ => Device::flex(),
    }
}

/// Parse a device name and open it, checking that it exists on this machine: a CUDA device
/// needs a GPU with that index that libtorch can see. Use this when a run starts (validation
/// only parses, so a GPU pipeline can be validated on a laptop).
pub fn open(s: &str) -> Result<Device, String> {
    let kind = parse_device(s)?;
    if let DeviceKind::LibTorchCuda(i) = kind {
        let n = cuda_device_count();
        if i >= n {
            return Err(if n == 0 {
                format!(
                    "device `{s}`: libtorch sees no CUDA device on this machine (is the NVIDIA driver loaded, and was torch installed with CUDA?); use `libtorch` for CPU"
                )
            } else {
                format!(
                    "device `{s}`: libtorch sees only {n} CUDA device(s), numbered 0 to {}",
                    n - 1
                )
            });
        }
    }
    Ok(device(kind))
}

/// libtorch's intra-op thread count as seen from the calling thread (None without `tch`).
pub fn libtorch_threads() -> Option<i32> {
    #[cfg(feature = "tch")]
    {
        Some(tch::get_num_threads())
    }
    #[cfg(not(feature = "tch"))]
    {
        None
    }
}

/// How many CUDA devices libtorch sees (0 without the `tch` feature).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "tch")]
    {
        usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
    }
    #[cfg(not(feature = "tch"))]
    {
        0
    }
}

/// Free and total bytes of CUDA device `index` (`cudaMemGetInfo`), `None` without a CUDA
/// runtime or such a device. The runtime is the one libtorch loaded (looked up by soname, so
/// nothing is linked at build time); asking creates the device's context, as a run would.
pub fn cuda_memory(index: usize) -> Option<(u64, u64)> {
    #[cfg(all(feature = "tch", target_os = "linux"))]
    {
        if index >= cuda_device_count() {
            return None;
        }
        cudart::mem_get_info(index)
    }
    #[cfg(not(all(feature = "tch", target_os = "linux")))]
    {
        let _ = index;
        None
    }
}

#[cfg(all(feature = "tch", target_os = "linux"))]
mod cudart {
    use std::ffi::{CString, c_int, c_void};

    type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
    type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;

    /// The CUDA runtime's sonames, newest first (torch 2.9 wheels: 12; 2.11 cu130: 13).
    const NAMES: &[&str] = &[
        "libcudart.so.13",
        "libcudart.so.12",
        "libcudart.so.11.0",
        "libcudart.so",
    ];

    fn sym<T>(lib: *mut c_void, name: &str) -> Option<T> {
        let c = CString::new(name).ok()?;
        // SAFETY: `lib` is a live handle from dlopen; the symbol is looked up by name.
        let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
        // SAFETY: the caller names a function of the CUDA runtime API with type `T` (a
        // function pointer of the same size as `p`).
        (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
    }

    pub fn mem_get_info(index: usize) -> Option<(u64, u64)> {
        let lib = NAMES.iter().find_map(|n| {
            let c = CString::new(*n).ok()?;
            // SAFETY: dlopen with a valid C string; a null result is handled.
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
            let h = if h.is_null() {
                // SAFETY: as above.
                unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) }
            } else {
                h
            };
            (!h.is_null()).then_some(h)
        })?;
        let get: GetDevice = sym(lib, "cudaGetDevice")?;
        let set: SetDevice = sym(lib, "cudaSetDevice")?;
        let info: MemGetInfo = sym(lib, "cudaMemGetInfo")?;
        let (mut before, mut free, mut total) = (0, 0usize, 0usize);
        // SAFETY: CUDA runtime calls with valid out-pointers; every status is checked, and the
        // calling thread's current device is restored.
        unsafe {
            if get(&mut before) != 0 || set(index as c_int) != 0 {
                return None;
            }
            let status = info(&mut free, &mut total);
            set(before);
            (status == 0).then_some((free as u64, total as u64))
        }
    }
}

/// Check a pipeline's `device` string (for validation).
pub fn check(s: &str) -> Result<(), String> {
    parse_device(s).map(|_| ())
}
