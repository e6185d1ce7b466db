//! Allocator settings for the `trustsplit` binary, which uses mimalloc.
//!
//! Every training step allocates and frees the same large buffers (activations, im2col patches,
//! gradients). With glibc's malloc, buffers above a few MiB are `mmap`ed and `munmap`ed each
//! time, so every step paid page faults, the kernel zeroing fresh pages, and TLB-shootdown
//! interrupts to every core the process runs on (the device worker's too, when it is a thread of
//! the same process): in a `perf` profile of `trustsplit bench step --scheme asymml` that was
//! about a quarter of the enclave thread's time. Inside a real enclave fresh pages cost more still
//! (SGX EDMM, or a fixed pre-committed heap), so reuse is the right default there as well.
//!
//! mimalloc keeps freed memory in its arenas for reuse; on top of its defaults we never purge it
//! back to the OS (by default it does after a second idle, and a step's buffers are then faulted
//! in again after evaluation or checkpointing pauses). The cost: the process keeps its peak heap
//! resident, which an enclave's fixed size assumes anyway. Measured effect (a Zen 5, 2026-12-01):
//! AsymML's VGG16 enclave time about 250 -> 175 ms per step; tee-only unchanged once
//! warmed up. Allowing 2 MiB pages as well measured no faster, and SGX enclaves have none.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc 3's option enum (milliseconds; -1 never purges).
const PURGE_DELAY: mi_option_t = 15;
const NEVER: std::os::raw::c_long = -1;

/// Applies the setting above. Call first thing in `main`, before other threads start (mimalloc's
/// option calls are not thread-safe).
pub fn configure_allocator() {
    // SAFETY: a plain option setter on a valid option id, called before other threads exist.
    unsafe { mi_option_set(PURGE_DELAY, NEVER) }
}

/// The purge delay mimalloc is using now, in milliseconds (-1: never).
pub fn purge_delay_ms() -> std::os::raw::c_long {
    // SAFETY: a getter on a valid option id.
    unsafe { mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_id_names_the_purge_delay() {
        // mimalloc 3 purges after 1000 ms by default (MIMALLOC_PURGE_DELAY overrides it): if the
        // enum moved in another version, the id would name another option and this would fail.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay_ms(), 1000);
        }
        configure_allocator();
        assert_eq!(purge_delay_ms(), NEVER);
    }
}
