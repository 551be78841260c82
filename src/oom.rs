//! Running out of memory ends flowrun with one clear line, never Rust's abort message and
//! backtrace: the global allocator is the system's, and a request it cannot serve prints what
//! was asked for and exits with status 1. Nothing is allocated on that path.

use std::alloc::{GlobalAlloc, Layout, System};

pub struct Allocator;

// SAFETY: every call is forwarded to `System` unchanged; only a failed request is intercepted,
// and that path never returns.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        p
    }
}

/// `bytes` in decimal into `buf`, returning the digits (no allocation).
fn digits(mut bytes: usize, buf: &mut [u8; 24]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (bytes % 10) as u8;
        bytes /= 10;
        if bytes == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cold]
fn out_of_memory(bytes: usize) -> ! {
    let mut buf = [0u8; 24];
    let n = digits(bytes, &mut buf);
    let parts: [&[u8]; 3] = [
        b"flowrun: error: out of memory: could not allocate ",
        n,
        b" bytes more. Make the batch smaller (prompts_per_iter, group_size, minibatch) or set \
          `rollout_graph: recompute`; `flowrun validate` estimates a pipeline's peak memory.\n",
    ];
    for part in parts {
        write_stderr(part);
    }
    #[cfg(unix)]
    // SAFETY: `_exit` ends the process at once, running nothing that could allocate.
    unsafe {
        libc::_exit(1)
    }
    #[cfg(not(unix))]
    std::process::abort()
}

fn write_stderr(bytes: &[u8]) {
    #[cfg(unix)]
    // SAFETY: writing a valid buffer to file descriptor 2.
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len());
    }
    #[cfg(not(unix))]
    let _ = bytes;
}
