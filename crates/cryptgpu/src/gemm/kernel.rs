//! The blocked, parallel `u64` GEMM behind every ring product: `C += A B` with wrapping
//! arithmetic, Goto-style (pack a `KC`-deep slab of `B` into `NR`-wide panels and of `A` into
//! `MR`-tall panels, then run an `MR x NR` register tile over them).

use rayon::prelude::*;

/// Rows of the register tile. 8 x 24 is 24 zmm accumulators; with three `B` vectors and the
/// broadcast `A` value it fits AVX-512's 32 registers without spilling, and it ran 5-10% faster
/// than 8 x 16 and 12 x 16 tiles.
pub(super) const MR: usize = 8;
/// Columns of the register tile: three 8-lane vectors of `u64`.
pub(super) const NR: usize = 24;
/// Depth of a packed slab: a `KC x NR` panel of `B` (36 KiB) and an `MR x KC` panel of `A`
/// (12 KiB) share Zen 5's 48 KiB L1 while the `A` panels stream from L2 (128 and 256 timed the
/// same within the noise of a shared machine).
const KC: usize = 192;
/// Rows of `A` packed at once (`MC x KC` = 192 KiB, well inside a Zen 5 core's 1 MiB L2).
const MC: usize = 128;
/// The widest block of `C` one parallel task owns, a whole number of `NR` panels.
const NC: usize = 20 * NR;

/// A read-only matrix in any layout: element `(r, c)` lives at `data[r * rs + c * cs]`, so a
/// transposed operand is just a view with swapped strides and is never copied.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub data: &'a [u64],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [u64], cols: usize) -> Self {
        View { data, rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [u64], cols: usize) -> Self {
        View { data, rs: 1, cs: cols }
    }

    fn skip_cols(self, c0: usize) -> Self {
        View { data: &self.data[c0 * self.cs..], ..self }
    }

    fn skip_rows(self, r0: usize) -> Self {
        View { data: &self.data[r0 * self.rs..], ..self }
    }
}

/// Which register-tile implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    /// `vpmullq` on 8 lanes; needs AVX-512F and AVX-512DQ.
    Avx512,
    /// Scalar sub-tiles: SSE2 and AVX2 have no 64-bit lane multiply to vectorise with.
    Portable,
}

impl Kernel {
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
            return Kernel::Avx512;
        }
        Kernel::Portable
    }
}

/// `C += A B` for `A: m x k`, `B: k x n` and a row-major `m x n` `C`.
pub(super) fn gemm_acc(c: &mut [u64], a: View, b: View, m: usize, k: usize, n: usize) {
    gemm_acc_with(Kernel::detect(), c, a, b, m, k, n)
}

pub(super) fn gemm_acc_with(kernel: Kernel, c: &mut [u64], a: View, b: View, m: usize, k: usize, n: usize) {
    assert_eq!(c.len(), m * n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let (mc, nc) = task_tile(m, n, threads);
    let tiles = m.div_ceil(mc) * n.div_ceil(nc);
    // A small `C` with a long `k` (a weight gradient summed over a whole batch) would otherwise
    // run on one thread: split `k` and add the partial products, which the ring lets us do in any
    // order without changing a bit.
    let parts = if tiles >= threads { 1 } else { (2 * threads).div_ceil(tiles).min(k / KC).max(1) };
    if parts == 1 {
        tiled(kernel, c, a, b, m, k, n, mc, nc);
        return;
    }
    let sum = (0..parts)
        .into_par_iter()
        .map(|part| {
            let (p0, p1) = (part * k / parts, (part + 1) * k / parts);
            let mut partial = vec![0u64; m * n];
            tiled(kernel, &mut partial, a.skip_cols(p0), b.skip_rows(p0), m, p1 - p0, n, mc, nc);
            partial
        })
        .reduce_with(|mut x, y| {
            add_assign(&mut x, &y);
            x
        });
    if let Some(sum) = sum {
        add_assign(c, &sum);
    }
}

pub(super) fn add_assign(acc: &mut [u64], x: &[u64]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = a.wrapping_add(v);
    }
}

/// The block of `C` one task owns: as large as the cache blocking allows, shrunk until there are
/// a few tasks per thread so that work stealing can even out a shared, noisy machine.
fn task_tile(m: usize, n: usize, threads: usize) -> (usize, usize) {
    let want = 4 * threads;
    let count = |mc: usize, nc: usize| m.div_ceil(mc) * n.div_ceil(nc);
    let mut mc = MC.min(m.next_multiple_of(MR));
    let mut nc = NC.min(n.next_multiple_of(NR));
    while count(mc, nc) < want && nc > 4 * NR {
        nc = (nc / 2).next_multiple_of(NR);
    }
    while count(mc, nc) < want && mc > 4 * MR {
        mc = (mc / 2).next_multiple_of(MR);
    }
    (mc, nc)
}

#[allow(clippy::too_many_arguments)]
fn tiled(kernel: Kernel, c: &mut [u64], a: View, b: View, m: usize, k: usize, n: usize, mc: usize, nc: usize) {
    let col_tiles = n.div_ceil(nc);
    let mut tasks: Vec<Vec<&mut [u64]>> = (0..m.div_ceil(mc) * col_tiles).map(|_| Vec::with_capacity(mc)).collect();
    for (i, row) in c.chunks_mut(n).enumerate() {
        for (jt, seg) in row.chunks_mut(nc).enumerate() {
            tasks[(i / mc) * col_tiles + jt].push(seg);
        }
    }
    tasks.into_par_iter().enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(apack, bpack), (t, mut rows)| {
            let (i0, j0) = ((t / col_tiles) * mc, (t % col_tiles) * nc);
            let (rows_here, cols_here) = (rows.len(), rows[0].len());
            for p0 in (0..k).step_by(KC) {
                let kc = KC.min(k - p0);
                let ap = pack_a(apack, a.skip_cols(p0), i0, rows_here, kc);
                let bp = pack_b(bpack, b.skip_rows(p0), j0, cols_here, kc);
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `Kernel::Avx512` is only chosen by `Kernel::detect` after it saw
                    // AVX-512F and AVX-512DQ on this CPU, the features `avx512::block` enables.
                    Kernel::Avx512 => unsafe { avx512::block(ap, bp, kc, &mut rows) },
                    _ => block_portable(ap, bp, kc, &mut rows),
                }
            }
        },
    );
}

/// `A`'s rows `i0..i0 + rows` over the slab's `kc` columns as `MR`-tall panels, each `kc` groups
/// of `MR` values, zero-padded past the last row so that the tile never needs an edge case.
fn pack_a<'b>(buf: &'b mut Vec<u64>, a: View, i0: usize, rows: usize, kc: usize) -> &'b [u64] {
    let len = rows.div_ceil(MR) * MR * kc;
    buf.resize(len.max(buf.len()), 0);
    for (ip, panel) in buf[..len].chunks_exact_mut(MR * kc).enumerate() {
        let r0 = i0 + ip * MR;
        let mr = MR.min(i0 + rows - r0);
        if a.rs == 1 {
            for (p, group) in panel.chunks_exact_mut(MR).enumerate() {
                group[..mr].copy_from_slice(&a.data[p * a.cs + r0..][..mr]);
                group[mr..].fill(0);
            }
        } else {
            for i in 0..MR {
                if i < mr {
                    for p in 0..kc {
                        panel[p * MR + i] = a.data[(r0 + i) * a.rs + p * a.cs];
                    }
                } else {
                    for p in 0..kc {
                        panel[p * MR + i] = 0;
                    }
                }
            }
        }
    }
    &buf[..len]
}

/// `B`'s slab rows over columns `j0..j0 + cols` as `NR`-wide panels, zero-padded like [`pack_a`].
fn pack_b<'b>(buf: &'b mut Vec<u64>, b: View, j0: usize, cols: usize, kc: usize) -> &'b [u64] {
    let len = cols.div_ceil(NR) * NR * kc;
    buf.resize(len.max(buf.len()), 0);
    for (jp, panel) in buf[..len].chunks_exact_mut(NR * kc).enumerate() {
        let c0 = j0 + jp * NR;
        let nr = NR.min(j0 + cols - c0);
        if b.cs == 1 {
            for (p, group) in panel.chunks_exact_mut(NR).enumerate() {
                group[..nr].copy_from_slice(&b.data[p * b.rs + c0..][..nr]);
                group[nr..].fill(0);
            }
        } else {
            for j in 0..NR {
                if j < nr {
                    for p in 0..kc {
                        panel[p * NR + j] = b.data[p * b.rs + (c0 + j) * b.cs];
                    }
                } else {
                    for p in 0..kc {
                        panel[p * NR + j] = 0;
                    }
                }
            }
        }
    }
    &buf[..len]
}

/// The AVX-512 register tile: 24 zmm accumulators, `vpmullq` (AVX-512DQ's 64-bit low multiply)
/// and `vpaddq`. Written with intrinsics because LLVM, left to vectorise [`tile_scalar`] itself,
/// vectorises across the tile's rows and keeps the accumulators in memory behind gathers and
/// scatters.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// zmm registers per tile row (8 `u64` lanes each).
    const LANES: usize = NR / 8;

    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) fn block(ap: &[u64], bp: &[u64], kc: usize, rows: &mut [&mut [u64]]) {
        super::block(ap, bp, kc, rows, |a, b| tile(a, b))
    }

    #[target_feature(enable = "avx512f,avx512dq")]
    #[inline]
    fn tile(ap: &[u64], bp: &[u64]) -> [[u64; NR]; MR] {
        let (a, _) = ap.as_chunks::<MR>();
        let (b, _) = bp.as_chunks::<NR>();
        let mut acc = [[_mm512_setzero_si512(); LANES]; MR];
        for (av, bv) in a.iter().zip(b) {
            let mut bvec = [_mm512_setzero_si512(); LANES];
            for (v, src) in bvec.iter_mut().zip(bv.chunks_exact(8)) {
                *v = load(src);
            }
            for (acc_row, &x) in acc.iter_mut().zip(av) {
                let xv = _mm512_set1_epi64(x as i64);
                for (s, &y) in acc_row.iter_mut().zip(&bvec) {
                    *s = _mm512_add_epi64(*s, _mm512_mullo_epi64(xv, y));
                }
            }
        }
        let mut out = [[0u64; NR]; MR];
        for (out_row, acc_row) in out.iter_mut().zip(&acc) {
            for (dst, &v) in out_row.chunks_exact_mut(8).zip(acc_row) {
                store(dst, v);
            }
        }
        out
    }

    /// Eight consecutive values as a vector. The element-wise form keeps this free of raw
    /// pointers; LLVM merges it into one `vmovdqu64`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load(v: &[u64]) -> __m512i {
        let v = |i: usize| v[i] as i64;
        _mm512_set_epi64(v(7), v(6), v(5), v(4), v(3), v(2), v(1), v(0))
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store(out: &mut [u64], v: __m512i) {
        let (lo, hi) = (_mm512_extracti64x4_epi64::<0>(v), _mm512_extracti64x4_epi64::<1>(v));
        let lanes = [
            _mm256_extract_epi64::<0>(lo),
            _mm256_extract_epi64::<1>(lo),
            _mm256_extract_epi64::<2>(lo),
            _mm256_extract_epi64::<3>(lo),
            _mm256_extract_epi64::<0>(hi),
            _mm256_extract_epi64::<1>(hi),
            _mm256_extract_epi64::<2>(hi),
            _mm256_extract_epi64::<3>(hi),
        ];
        for (o, l) in out.iter_mut().zip(lanes) {
            *o = l as u64;
        }
    }
}

fn block_portable(ap: &[u64], bp: &[u64], kc: usize, rows: &mut [&mut [u64]]) {
    block(ap, bp, kc, rows, tile_scalar)
}

/// Every register tile of one packed slab, added into `C`'s rows. The `B` panel is the outer loop
/// so it stays in L1 while the `A` panels pass.
#[inline(always)]
fn block(ap: &[u64], bp: &[u64], kc: usize, rows: &mut [&mut [u64]], tile: impl Fn(&[u64], &[u64]) -> [[u64; NR]; MR]) {
    let (mc, nc) = (rows.len(), rows[0].len());
    for (jp, bpanel) in bp.chunks_exact(NR * kc).enumerate() {
        let j0 = jp * NR;
        let nr = NR.min(nc - j0);
        for (ip, apanel) in ap.chunks_exact(MR * kc).enumerate() {
            let i0 = ip * MR;
            let mr = MR.min(mc - i0);
            let acc = tile(apanel, bpanel);
            for (row, acc_row) in rows[i0..i0 + mr].iter_mut().zip(&acc) {
                add_assign(&mut row[j0..j0 + nr], &acc_row[..nr]);
            }
        }
    }
}

/// One `MR x NR` tile in `SI x SJ` pieces whose accumulators and operands fit the 16 general
/// registers; a whole tile would spill on every step. The scalar multiplier bounds it: 2 x 4,
/// 4 x 2, 4 x 3 and 4 x 4 pieces ran within 10% of each other (about 6x slower than AVX-512).
#[inline(always)]
fn tile_scalar(ap: &[u64], bp: &[u64]) -> [[u64; NR]; MR] {
    const SI: usize = 4;
    const SJ: usize = 2;
    let (a, _) = ap.as_chunks::<MR>();
    let (b, _) = bp.as_chunks::<NR>();
    let mut acc = [[0u64; NR]; MR];
    for i0 in (0..MR).step_by(SI) {
        for j0 in (0..NR).step_by(SJ) {
            let mut sub = [[0u64; SJ]; SI];
            for (av, bv) in a.iter().zip(b) {
                let (x, y): (&[u64; SI], &[u64; SJ]) =
                    (av[i0..i0 + SI].try_into().unwrap(), bv[j0..j0 + SJ].try_into().unwrap());
                for (sub_row, &xv) in sub.iter_mut().zip(x) {
                    for (s, &yv) in sub_row.iter_mut().zip(y) {
                        *s = s.wrapping_add(xv.wrapping_mul(yv));
                    }
                }
            }
            for (acc_row, sub_row) in acc[i0..i0 + SI].iter_mut().zip(&sub) {
                acc_row[j0..j0 + SJ].copy_from_slice(sub_row);
            }
        }
    }
    acc
}
