//! Runtime dispatch of plain loops to wider vector instructions.
//!
//! The workspace is compiled for baseline x86-64 (SSE2), so that one binary runs on every such CPU;
//! loops that the compiler vectorises on their own (batch-norm's normalisation, f64 sums of f32
//! values) then use 128-bit registers and convert f32 to f64 two at a time.
//! [`multiversion!`] compiles such a function's body three times, for AVX-512, for AVX2 with FMA
//! and for the baseline, and runs the best one the CPU supports. The results do not depend on the
//! path: Rust never contracts a multiply and an add into a fused multiply-add or reorders
//! floating-point operations on its own, so each operation rounds as in the baseline code (tested
//! bit for bit).
//!
//! Its users: the elementwise adds and f64 sums ([`crate::elementwise`], behind AsymML's energies),
//! batch-norm's portable statistics and per-sample loops, the SGD step (`trustsplit-nn`'s
//! `optim`) and the device checks' projections (`trustsplit-schemes`' `device_check`).
//!
//! Tried and dropped:
//! - Building the workspace with `-C target-cpu=native` instead: no gain on AsymML's best VGG16 row
//!   (138-151 against 151-154 ms enclave); on ResNet18's, whose batch-norm converts f32 to f64,
//!   "rest" went 96-116 -> 72-90 ms, and the multiversioned loops here alone give 78-87 ms without
//!   tying the binary to one CPU (2026-12-02).

use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction sets [`multiversion!`] compiles for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Avx512,
    Avx2,
    Baseline,
}

/// The highest level tests allow (0: no limit, else `Level as u8 + 1`).
static CAP: AtomicU8 = AtomicU8::new(0);

/// The best level this CPU supports (the standard library caches the detection).
#[inline]
pub fn level() -> Level {
    let detected = detect();
    match CAP.load(Ordering::Relaxed) {
        0 => detected,
        1 => detected.max(Level::Avx512),
        2 => detected.max(Level::Avx2),
        _ => Level::Baseline,
    }
}

#[inline]
fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Runs `f` with the multiversioned functions limited to `cap` (for tests that compare the paths;
/// the limit is process-wide, which other code tolerates because every path gives the same bits).
#[doc(hidden)]
pub fn with_level_cap<R>(cap: Level, f: impl FnOnce() -> R) -> R {
    CAP.store(cap as u8 + 1, Ordering::Relaxed);
    let out = f();
    CAP.store(0, Ordering::Relaxed);
    out
}

/// Defines a function whose body is compiled for AVX-512, for AVX2 with FMA and for the baseline,
/// and runs the best version [`level`] allows. The body is an `#[inline(always)]` inner function,
/// so it (and the `#[inline(always)]` helpers and small closures it calls) is compiled inside each
/// `#[target_feature]` wrapper.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match $crate::simd::level() {
                // SAFETY: `level` reports a level only where the CPU has its features.
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Level::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Level::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub use multiversion;
