//! Per-sample low-rank / residual split for AsymML (3LegRace, PoPETs 2022).
//!
//! An activation X (C channels x P positions, row-major) is split as X = U V + R: U (C x r) has
//! orthonormal columns spanning the principal channel subspace of a group of samples, V = U^T X holds
//! the "principal channels" and R is the residual. The big products run in f32 on the gemm kernel; only
//! the small symmetric eigenproblems run in f64 (faer), where accumulated rounding would hurt.
//!
//! The subspace is exact (the eigendecomposition of the smaller Gram matrix) or fast (one step of
//! subspace iteration from a random start block, then Rayleigh-Ritz). The fast one also hands the split its coordinates `V`, from its Rayleigh-Ritz projection; with a fixed
//! rank, a large batch's basis comes from a random quarter of its samples and each sample's split
//! projects onto it. A batch's small maps are laid side by side for the channel products.
//!
//! Tried and dropped:
//! - Warm-starting each group's fast subspace from the previous group's basis (the previous
//!   sample's, or the previous batch's with `--basis batch`), with 2 oversampling columns instead
//!   of 4: a little cheaper, but a sample's residual then depended on other samples and on earlier
//!   batches (test examples included) while it was charged as its own. Every group now starts
//!   from fresh random columns drawn independently of the data (2026-12-07; the cost is in
//!   docs/schemes/asymml.md, "One convolution, forward").
//! - Carrying the fast subspace's block from step to step (one pass over each activation instead of
//!   two): the basis lags a batch behind; on VGG11-BN's activations the residual share rose layer
//!   by layer up to 4.6x (0.26% -> 0.81% of the energy at the next-to-last layer), and a unit test
//!   with a batch-specific noise floor left 1.75x the optimal residual against 1.003x, for ~4% of
//!   the best VGG16 row (2026-12-02).
//! - Two oversampling columns from a cold start: up to 10% more (relative) of the energy left in
//!   the residual (28.4 -> 31.3% in one case), so cold starts keep four (2026-12-03; an earlier try
//!   for every start, 2026-12-02, saved ~1.5% of the enclave's time).
//! - Adding up the total energy in the power step's pass instead of its own: the power step, bound
//!   by its arithmetic, got slower by as much as the pass saved (ResNet18's best row: subspace
//!   15.6-15.8% -> 17.5-17.7% of the profile, energy 3.8% -> 2.1-2.4%) (2026-12-02).
//! - Skipping the total-energy pass for a fixed rank (the total being `||V||^2 + ||R||^2` after the
//!   split): 136-143 against 136-140 ms for the best VGG16 row, nothing to measure (2026-12-02).
//! - The energy threshold's basis from a quarter of the batch, its rank checked by the split and
//!   recomputed from every sample where it fell short: on untrained models' flat spectra it cost
//!   more than it saved (VGG16's energy row 260-267 -> 257-280 ms, ResNet18's 716-770 -> 860-861
//!   ms) (2026-12-02, reverted in cd35a4a).
//! - Sampling a quarter of the batch for the power step only, the Rayleigh-Ritz projection over
//!   every sample: ResNet18's subspace 62-64 -> 45-49 ms, superseded by sampling both (2026-12-02).
//!
//! Not yet tried:
//! - The energy threshold's basis from a quarter of the batch on a trained model, whose decaying
//!   spectra may make it pay.

use faer::{Mat, Side};
use rand_distr::StandardNormal;
use trustsplit_kernels::channel_products;
use trustsplit_kernels::elementwise::{dot_f64_of, sum_f64_of};
use trustsplit_kernels::matmul::{matmul, parallelism, MatRef};

/// How many components to keep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankPolicy {
    /// Keep exactly r (capped at min(C, total positions)).
    Fixed(usize),
    /// Smallest r whose residual energy ||X - U U^T X||_F^2 <= tau * ||X||_F^2 (summed over the group),
    /// at most max_rank (and min(C, positions)).
    Energy { tau: f64, max_rank: usize },
}

/// How the subspace is found (`--subspace exact|fast`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Subspace {
    /// Exact top-r from the eigen-decomposition of the smaller Gram matrix (C x C or nP x nP).
    Exact,
    /// One step of subspace iteration from a random start block plus Rayleigh-Ritz; never
    /// forms a C x C Gram. Costs about 3 C nP k multiply-adds with k = target rank + 4. With a
    /// fixed rank, a large group's basis comes from a random quarter of its samples (see
    /// [`find_basis_and_coordinates`]).
    Fast,
}

/// An orthonormal basis of a group's principal subspace.
#[derive(Clone, Debug)]
pub struct Basis {
    pub channels: usize,
    pub rank: usize,
    /// C x rank, row-major, orthonormal columns.
    pub u: Vec<f32>,
    /// sum over the group of ||X_b||_F^2 (over the samples it was computed from, where the fast
    /// subspace sampled the group)
    pub total_energy: f64,
    /// sum over the group of ||X_b - U U^T X_b||_F^2 (likewise)
    pub residual_energy: f64,
    /// multiply-adds this call spent (Gram/products/eigen estimate), for cost reporting
    pub macs: u64,
}

/// Extra columns of the fast start block: they absorb the directions just below the cut (two
/// instead of four left up to 10% more, relative, of the energy in the residual: 2026-12-03).
const OVERSAMPLE: usize = 4;

/// Positions (over the samples) that a sampled fast basis is computed from at the least; see
/// [`basis_samples`].
const SAMPLED_COLUMNS: usize = 1024;

/// A column is numerically dependent when orthogonalisation leaves less than this fraction of its norm
/// (just above the f32 rounding level of the products that made it).
const DEPENDENT: f64 = 1e-6;

/// Rough multiply-adds of a dense symmetric eigendecomposition with vectors (tridiagonalisation and
/// back-transformation dominate).
fn eig_macs(m: usize) -> u64 {
    4 * (m as u64).pow(3)
}

/// The group as the C x (n P) matrix [X_1 ... X_n], kept as separate per-sample slices.
struct Group<'a> {
    xs: &'a [&'a [f32]],
    c: usize,
    p: usize,
}

impl Group<'_> {
    fn np(&self) -> usize {
        self.xs.len() * self.p
    }
    fn x(&self, b: usize) -> MatRef<'_> {
        MatRef::row_major(self.xs[b], self.c, self.p)
    }

    /// The samples side by side: C x nP, sample b in columns b P .. (b + 1) P.
    fn side_by_side(&self) -> Vec<f32> {
        let (c, p) = (self.c, self.p);
        // Appended row by row rather than copied into a zeroed buffer: no pass to zero it first.
        let mut out = Vec::with_capacity(c * self.np());
        for ci in 0..c {
            for x in self.xs {
                out.extend_from_slice(&x[ci * p..(ci + 1) * p]);
            }
        }
        out
    }

    /// Calls `f` with the group as blocks of `C x width` for the channel products: small maps of a
    /// batch side by side as one C x nP matrix (the products are much faster on long rows than on
    /// many short ones, see `channel_products`), larger ones sample by sample.
    fn with_blocks<T>(&self, f: impl FnOnce(&[&[f32]], usize) -> T) -> T {
        if self.xs.len() > 1 && self.p < channel_products::LONG_ROWS {
            let wide = self.side_by_side();
            f(&[wide.as_slice()], self.np())
        } else {
            f(self.xs, self.p)
        }
    }
}

/// `samples`: the group's samples, each C x positions row-major (all the same length C*positions).
/// rank 0 is allowed when the policy gives 0 (Fixed(0)) or all samples are zero: then u is empty and the
/// residual is everything. (The tests' shorthand for [`find_basis_and_coordinates`] on finite data.)
#[cfg(test)]
pub fn find_basis(
    samples: &[&[f32]],
    channels: usize,
    positions: usize,
    policy: RankPolicy,
    method: Subspace,
    rng: &mut impl rand::Rng,
) -> Basis {
    find_basis_and_coordinates(samples, channels, positions, policy, method, rng).expect("finite samples").0
}

/// The basis of a group of samples, and the samples' coordinates `V = U^T X` where the method has them for free:
/// the fast subspace's Rayleigh-Ritz step projects the samples on its block `Q` and takes `U = Q S`,
/// so `U^T X = S^T (Q^T X)` costs `r k` multiply-adds per position instead of a product with `X`.
/// They come as `len x rank x positions` (sample by sample, each `rank x positions`), ready for
/// [`channel_products::residual`]; the exact method gives `None`.
///
/// The fast subspace with a fixed rank computes a large group's basis from a random quarter of its
/// samples (at least `SAMPLED_COLUMNS` positions; `basis_samples`) and gives no coordinates: a
/// basis per batch only has to capture the channels the batch has in common, which a quarter of a
/// batch of 32 large maps shows nearly as well as the whole (on VGG11-BN's activations, its basis
/// left about 1% more of the energy in the residuals, 2026-12-02), and the
/// split that every sample needs anyway then projects it in the same sweep. The basis' energies are
/// then those of the quarter. An energy threshold is a promise about the whole group, so its basis
/// sees every sample (a quarter's rank, checked by the split and recomputed from every sample where
/// it fell short, cost more than it saved on flat spectra: see the module docs).
///
/// An error where the samples hold NaN or infinite values (a diverged training run: no subspace
/// is defined), or where the small eigenproblem does not converge. Where a sampled basis is
/// computed, only the sampled part is checked: the caller's split shows the rest.
pub fn find_basis_and_coordinates(
    samples: &[&[f32]],
    channels: usize,
    positions: usize,
    policy: RankPolicy,
    method: Subspace,
    rng: &mut impl rand::Rng,
) -> Result<(Basis, Option<Vec<f32>>), String> {
    for x in samples {
        assert_eq!(x.len(), channels * positions, "find_basis: sample is not C x positions");
    }
    let sampled = basis_samples(method, policy, samples.len(), positions);
    if sampled < samples.len() {
        let mut chosen = rand::seq::index::sample(rng, samples.len(), sampled).into_vec();
        chosen.sort_unstable();
        let part: Vec<&[f32]> = chosen.into_iter().map(|b| samples[b]).collect();
        let group = Group { xs: &part, c: channels, p: positions };
        let (basis, _) = find_basis_from_every_sample(&group, policy, method, rng)?;
        return Ok((basis, None));
    }
    find_basis_from_every_sample(&Group { xs: samples, c: channels, p: positions }, policy, method, rng)
}

/// How many of a group's `n` samples (of `p` positions each) [`find_basis_and_coordinates`]
/// computes its basis from: for the fast subspace with a fixed rank a quarter, but at least
/// [`SAMPLED_COLUMNS`] positions in all; otherwise all.
fn basis_samples(method: Subspace, policy: RankPolicy, n: usize, p: usize) -> usize {
    match (method, policy) {
        (Subspace::Fast, RankPolicy::Fixed(_)) => n.div_ceil(4).max(SAMPLED_COLUMNS.div_ceil(p.max(1))).min(n),
        _ => n,
    }
}

/// [`find_basis_and_coordinates`] from every sample of the group `g`.
fn find_basis_from_every_sample(
    g: &Group,
    policy: RankPolicy,
    method: Subspace,
    rng: &mut impl rand::Rng,
) -> Result<(Basis, Option<Vec<f32>>), String> {
    let channels = g.c;
    let total: f64 = g.xs.iter().map(|x| energy(x)).sum();
    if !total.is_finite() {
        return Err("it holds NaN or infinite values".into());
    }
    let target = match policy {
        RankPolicy::Fixed(r) => r,
        RankPolicy::Energy { max_rank, .. } => max_rank,
    }
    .min(channels.min(g.np()));
    if target == 0 {
        return Ok((finish(channels, Vec::new(), total, total, 0), None));
    }
    Ok(match method {
        Subspace::Exact => (exact_basis(g, policy, total, target, gram_side(channels, g.np()))?, None),
        Subspace::Fast => {
            let (basis, coordinates) = fast_basis(g, policy, total, target, rng)?;
            (basis, Some(coordinates))
        }
    })
}

/// Splits one sample with a basis into v = U^T x (rank x positions, row-major) and residual =
/// x - U v (C x positions), written into caller-owned buffers (both overwritten): the enclave splits
/// every activation of every step, so it avoids temporaries. Also usable for gradients
/// (C_out x P_out). Returns the residual's energy (sum of squares in f64), which clipping needs.
pub fn split_into(basis: &Basis, x: &[f32], positions: usize, v: &mut [f32], residual: &mut [f32]) -> f64 {
    assert_eq!(x.len(), basis.channels * positions, "split: sample is not C x positions");
    assert_eq!(v.len(), basis.rank * positions, "split: v is not rank x positions");
    assert_eq!(residual.len(), x.len(), "split: residual is not C x positions");
    channel_products::split(&basis.u, basis.rank, x, positions, v, residual)
}

/// Writes `residual = x - U v` for coordinates `v` that [`find_basis_and_coordinates`] gave (instead
/// of [`split_into`]'s own projection); returns the residual's energy.
pub fn residual_into(basis: &Basis, x: &[f32], positions: usize, v: &[f32], residual: &mut [f32]) -> f64 {
    assert_eq!(x.len(), basis.channels * positions, "residual: sample is not C x positions");
    channel_products::residual(&basis.u, basis.rank, x, positions, v, residual)
}

/// Sum of squares in f64.
fn energy(x: &[f32]) -> f64 {
    sum_f64_of(x, |v| v * v)
}

/// Which Gram matrix the exact method decomposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GramSide {
    /// sum_b X_b X_b^T (C x C).
    Channels,
    /// X^T X ((nP) x (nP)), whose eigenvectors lift to left singular vectors.
    Positions,
}

/// The smaller Gram is cheaper to form and decompose; both have the same nonzero spectrum.
fn gram_side(c: usize, np: usize) -> GramSide {
    if c <= np {
        GramSide::Channels
    } else {
        GramSide::Positions
    }
}

fn exact_basis(g: &Group, policy: RankPolicy, total: f64, target: usize, side: GramSide) -> Result<Basis, String> {
    let (c, p, np, n) = (g.c, g.p, g.np(), g.xs.len());
    let (m, gram, gram_macs) = match side {
        GramSide::Channels => (c, channel_gram(g), (c * c * np) as u64),
        GramSide::Positions => (np, position_gram(g), (n * (n + 1) / 2 * p * p * c) as u64),
    };
    let (values, vecs) = sym_eigen_desc(m, |i, j| f64::from(gram[i * m + j]))?;
    // The trailing eigenvalues are exactly the energy a rank-r basis misses (summing them directly avoids
    // cancelling against the total).
    let mut residuals = vec![0.0; m + 1];
    for i in (0..m).rev() {
        residuals[i] = residuals[i + 1] + values[i];
    }
    let r = choose_rank(policy, &residuals, total, target);
    let mut cols: Vec<Vec<f64>> = (0..r).map(|j| (0..m).map(|i| vecs[(i, j)]).collect()).collect();
    let mut macs = gram_macs + eig_macs(m);
    if side == GramSide::Positions {
        cols = lift(g, &cols);
        macs += (c * np * r) as u64;
    }
    // Re-orthonormalising also normalises the lifted u_i = X w_i (norm sqrt(lambda_i)) and completes the
    // basis where lambda_i = 0.
    orthonormalize(&mut cols);
    Ok(finish(c, cols, total, residuals[r], macs))
}

/// sum_b X_b X_b^T (C x C, f32, full).
fn channel_gram(g: &Group) -> Vec<f32> {
    let mut gram = vec![0.0; g.c * g.c];
    for b in 0..g.xs.len() {
        matmul(g.x(b), g.x(b).t(), &mut gram, g.c, b > 0, parallelism(1));
    }
    gram
}

/// X^T X ((nP) x (nP), f32): only the blocks on and below the diagonal, which is all the eigen-solver
/// reads.
fn position_gram(g: &Group) -> Vec<f32> {
    let (p, np) = (g.p, g.np());
    let mut gram = vec![0.0; np * np];
    for a in 0..g.xs.len() {
        for b in 0..=a {
            matmul(g.x(a).t(), g.x(b), &mut gram[a * p * np + b * p..], np, false, parallelism(1));
        }
    }
    gram
}

/// Maps eigenvectors w_j of X^T X (length nP) to X w_j (length C).
fn lift(g: &Group, ws: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (c, p, r) = (g.c, g.p, ws.len());
    let w: Vec<f32> = (0..g.np() * r).map(|k| ws[k % r][k / r] as f32).collect(); // nP x r row-major
    let mut xw = vec![0.0; c * r];
    for b in 0..g.xs.len() {
        let wb = MatRef::row_major(&w[b * p * r..(b + 1) * p * r], p, r);
        matmul(g.x(b), wb, &mut xw, r, b > 0, parallelism(1));
    }
    to_cols(&xw, c, r)
}

fn fast_basis(
    g: &Group,
    policy: RankPolicy,
    total: f64,
    target: usize,
    rng: &mut impl rand::Rng,
) -> Result<(Basis, Vec<f32>), String> {
    let (c, p, np, n) = (g.c, g.p, g.np(), g.xs.len());
    let k = (target + OVERSAMPLE).min(c.min(np));
    // Gaussian, drawn afresh for every group: nothing carries over from another group or batch.
    let omega: Vec<f32> = (0..c * k).map(|_| rng.sample(StandardNormal)).collect();
    let mut bm = vec![0.0; k * np];
    let q = g.with_blocks(|blocks, width| {
        // Y = X (X^T Omega): one power step squares the spectrum, so the tail below the cut leaks
        // far less into the block than with Y = X Omega.
        let mut y = vec![0.0; c * k];
        for (b, x) in blocks.iter().enumerate() {
            channel_products::power_step(x, width, &omega, k, &mut y, b > 0);
        }
        let mut q = to_cols(&y, c, k);
        orthonormalize(&mut q);
        // Rayleigh-Ritz: the best rank-r subspace inside span(Q) comes from the eigenvectors of
        // B B^T, B = Q^T X.
        let q32 = to_row_major(&q, c);
        for (b, x) in blocks.iter().enumerate() {
            channel_products::project(&q32, k, x, width, &mut bm[b * width..], np);
        }
        q
    });
    let dot = |i: usize, j: usize| dot_f64_of(&bm[i * np..(i + 1) * np], &bm[j * np..(j + 1) * np], |a, b| a * b);
    let (ritz, s) = sym_eigen_desc(k, dot)?;
    // ||U^T X||^2 is the sum of the kept Ritz values, so the residual is what they leave of the total.
    let mut residuals = vec![total; k + 1];
    for i in 0..k {
        residuals[i + 1] = (residuals[i] - ritz[i]).max(0.0);
    }
    let r = choose_rank(policy, &residuals, total, target);
    let cols = (0..r).map(|j| (0..c).map(|i| (0..k).map(|l| q[l][i] * s[(l, j)]).sum()).collect()).collect();
    // Each sample's V = S_r^T B (B's sample b is its columns b P .. (b + 1) P).
    let mut coordinates = vec![0.0f32; n * r * p];
    for (b, v) in coordinates.chunks_exact_mut((r * p).max(1)).enumerate() {
        for (j, v_row) in v.chunks_exact_mut(p).enumerate() {
            for l in 0..k {
                let weight = s[(l, j)] as f32;
                let b_row = &bm[l * np + b * p..][..p];
                v_row.iter_mut().zip(b_row).for_each(|(v, &x)| *v += weight * x);
            }
        }
    }
    let macs = 3 * c * np * k + k * k * np + 2 * c * k * k + c * k * r + r * k * np;
    Ok((finish(c, cols, total, residuals[r], macs as u64 + eig_macs(k)), coordinates))
}

/// `residuals[r]` is the residual energy at rank `r`; `cap < residuals.len()`.
fn choose_rank(policy: RankPolicy, residuals: &[f64], total: f64, cap: usize) -> usize {
    match policy {
        RankPolicy::Fixed(r) => r.min(cap),
        RankPolicy::Energy { tau, .. } => (0..=cap).find(|&r| residuals[r] <= tau * total).unwrap_or(cap),
    }
}

/// Eigen-decomposition of the symmetric m x m matrix whose lower triangle is `entry(i, j)` (i >= j):
/// eigenvalues descending and clamped at 0 (rounding can push a zero one below), vectors in matching columns.
fn sym_eigen_desc(m: usize, entry: impl Fn(usize, usize) -> f64) -> Result<(Vec<f64>, Mat<f64>), String> {
    // Only the lower triangle is read (Side::Lower), so each entry is computed once.
    let a = Mat::<f64>::from_fn(m, m, |i, j| if i >= j { entry(i, j) } else { 0.0 });
    let evd = a
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| format!("the {m} x {m} symmetric eigen-decomposition of its subspace did not converge ({e:?})"))?;
    let (s, u) = (evd.S().column_vector(), evd.U());
    let values = (0..m).map(|i| s[m - 1 - i].max(0.0)).collect();
    Ok((values, Mat::from_fn(m, m, |i, j| u[(i, m - 1 - j)])))
}

/// Orthonormalises columns in place: modified Gram-Schmidt, two passes ("twice is enough") so f64
/// orthogonality holds even for nearly dependent columns. A numerically dependent column is replaced by
/// the unit vector least covered by the earlier ones, so the count is kept (callers keep it <= length).
fn orthonormalize(cols: &mut [Vec<f64>]) {
    for j in 0..cols.len() {
        let (done, rest) = cols.split_at_mut(j);
        let col = &mut rest[0];
        let before = norm(col);
        let mut after = project_out(done, col);
        if after <= DEPENDENT * before || after == 0.0 {
            let coverage = |t: usize| done.iter().map(|q| q[t] * q[t]).sum::<f64>();
            let t = (0..col.len()).min_by(|&a, &b| coverage(a).total_cmp(&coverage(b))).expect("empty column");
            col.iter_mut().enumerate().for_each(|(i, v)| *v = if i == t { 1.0 } else { 0.0 });
            after = project_out(done, col);
        }
        col.iter_mut().for_each(|v| *v /= after);
    }
}

/// Removes the components along the (orthonormal) `done` columns, twice; returns the remaining norm.
fn project_out(done: &[Vec<f64>], col: &mut [f64]) -> f64 {
    for _ in 0..2 {
        for q in done {
            let d: f64 = q.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
            col.iter_mut().zip(q).for_each(|(v, qi)| *v -= d * qi);
        }
    }
    norm(col)
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Columns (as f64) of a row-major rows x cols f32 matrix.
fn to_cols(a: &[f32], rows: usize, cols: usize) -> Vec<Vec<f64>> {
    (0..cols).map(|j| (0..rows).map(|i| f64::from(a[i * cols + j])).collect()).collect()
}

/// Row-major f32 matrix (rows x cols.len()) from f64 columns.
fn to_row_major(cols: &[Vec<f64>], rows: usize) -> Vec<f32> {
    let r = cols.len();
    (0..rows * r).map(|k| cols[k % r][k / r] as f32).collect()
}

fn finish(c: usize, cols: Vec<Vec<f64>>, total: f64, residual: f64, macs: u64) -> Basis {
    let rank = cols.len();
    // A full basis of the channel space leaves nothing; say so exactly rather than report rounding.
    let residual_energy = if rank == c { 0.0 } else { residual.max(0.0) };
    Basis { channels: c, rank, u: to_row_major(&cols, c), total_energy: total, residual_energy, macs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// [`split_into`] into fresh buffers: (v, residual).
    fn split(basis: &Basis, x: &[f32], positions: usize) -> (Vec<f32>, Vec<f32>) {
        let mut v = vec![0.0; basis.rank * positions];
        let mut residual = vec![0.0; x.len()];
        split_into(basis, x, positions, &mut v, &mut residual);
        (v, residual)
    }

    /// Rebuilds U v (C x positions), the low-rank part.
    fn low_rank_part(basis: &Basis, v: &[f32], positions: usize) -> Vec<f32> {
        assert_eq!(v.len(), basis.rank * positions, "low_rank_part: v is not rank x positions");
        let u = MatRef::row_major(&basis.u, basis.channels, basis.rank);
        let mut out = vec![0.0; basis.channels * positions];
        matmul(u, MatRef::row_major(v, basis.rank, positions), &mut out, positions, false, parallelism(1));
        out
    }

    fn gauss(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| scale * rng.sample::<f32, _>(StandardNormal)).collect()
    }

    /// n samples X_b = A B_b + noise sharing a rank-`rank` channel subspace A.
    fn low_rank_group(rng: &mut ChaCha8Rng, c: usize, p: usize, n: usize, rank: usize, noise: f32) -> Vec<Vec<f32>> {
        let a = gauss(rng, c * rank, 1.0);
        (0..n)
            .map(|_| {
                let b = gauss(rng, rank * p, 1.0);
                let mut x = gauss(rng, c * p, noise);
                matmul(MatRef::row_major(&a, c, rank), MatRef::row_major(&b, rank, p), &mut x, p, true, parallelism(1));
                x
            })
            .collect()
    }

    /// [X_1 .. X_n] = A diag(sigmas) W^T + noise with orthonormal A (C x t) and W (nP x t).
    fn spectral_group(rng: &mut ChaCha8Rng, c: usize, p: usize, n: usize, sigmas: &[f64], noise: f32) -> Vec<Vec<f32>> {
        // No more components than the space has room for: orthonormalising more columns than their
        // length would divide by a zero (or rounding-level) remainder.
        let sigmas = &sigmas[..sigmas.len().min(c).min(n * p)];
        let mut a = to_cols(&gauss(rng, c * sigmas.len(), 1.0), c, sigmas.len());
        let mut w = to_cols(&gauss(rng, n * p * sigmas.len(), 1.0), n * p, sigmas.len());
        orthonormalize(&mut a);
        orthonormalize(&mut w);
        let mut xs: Vec<Vec<f32>> = (0..n).map(|_| gauss(rng, c * p, noise)).collect();
        for (b, x) in xs.iter_mut().enumerate() {
            for (i, j) in (0..c).flat_map(|i| (0..p).map(move |j| (i, j))) {
                x[i * p + j] += (0..sigmas.len()).map(|t| a[t][i] * sigmas[t] * w[t][b * p + j]).sum::<f64>() as f32;
            }
        }
        xs
    }

    fn views(xs: &[Vec<f32>]) -> Vec<&[f32]> {
        xs.iter().map(Vec::as_slice).collect()
    }

    /// sum_b ||X_b - U U^T X_b||^2 measured through `split`.
    fn measured_residual(basis: &Basis, xs: &[Vec<f32>], p: usize) -> f64 {
        xs.iter().map(|x| energy(&split(basis, x, p).1)).sum()
    }

    /// Trailing squared singular values of [X_1 .. X_n], from faer's SVD in f64 (not an eigen path).
    fn svd_tail(xs: &[Vec<f32>], c: usize, p: usize, r: usize) -> f64 {
        let m = Mat::<f64>::from_fn(c, xs.len() * p, |i, j| f64::from(xs[j / p][i * p + j % p]));
        m.singular_values().expect("svd").iter().skip(r).map(|s| s * s).sum()
    }

    fn assert_orthonormal(basis: &Basis) {
        let (c, r) = (basis.channels, basis.rank);
        for a in 0..r {
            for b in 0..r {
                let d: f32 = (0..c).map(|i| basis.u[i * r + a] * basis.u[i * r + b]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-4, "U^T U [{a},{b}] = {d}");
            }
        }
    }

    fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
        (got - want).abs() <= rel * want.abs() + abs
    }

    #[test]
    fn split_reconstructs_and_is_orthogonal() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for case in 0..12 {
            let (c, p, n) = (rng.random_range(1..24), rng.random_range(1..30), rng.random_range(1..4));
            let rank = rng.random_range(1..5);
            let xs = low_rank_group(&mut rng, c, p, n, rank, 0.2);
            let method = if case % 2 == 0 { Subspace::Exact } else { Subspace::Fast };
            let r = rng.random_range(0..=c.min(n * p));
            let basis = find_basis(&views(&xs), c, p, RankPolicy::Fixed(r), method, &mut rng);
            assert_eq!(basis.rank, r);
            assert_orthonormal(&basis);
            for x in &xs {
                let (v, res) = split(&basis, x, p);
                let low = low_rank_part(&basis, &v, p);
                let err: Vec<f32> = (0..x.len()).map(|i| low[i] + res[i] - x[i]).collect();
                assert!(energy(&err).sqrt() <= 1e-5 * energy(x).sqrt(), "case {case}: reconstruction");
                let (ut_r, _) = split(&basis, &res, p);
                assert!(energy(&ut_r).sqrt() <= 1e-4 * energy(x).sqrt(), "case {case}: U^T R != 0");
            }
        }
    }

    #[test]
    fn exact_matches_svd_tail_on_both_gram_sides() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // Fixed shapes cover C > nP (positions Gram) and C <= nP (channels Gram); then random ones.
        let mut shapes = vec![(12, 3, 2), (20, 2, 3), (5, 16, 1), (8, 4, 2), (30, 1, 7)];
        shapes.extend((0..10).map(|_| (rng.random_range(1..40), rng.random_range(1..20), rng.random_range(1..4))));
        for (c, p, n) in shapes {
            let rank = rng.random_range(1..6);
            let xs = low_rank_group(&mut rng, c, p, n, rank, 0.1);
            let r = rng.random_range(1..=c.min(n * p));
            let basis = find_basis(&views(&xs), c, p, RankPolicy::Fixed(r), Subspace::Exact, &mut rng);
            let total = basis.total_energy;
            let reference = svd_tail(&xs, c, p, r);
            let shape = (c, p, n, r);
            assert!(close(basis.residual_energy, reference, 1e-3, 1e-5 * total), "{shape:?}: {basis:?} vs {reference}");
            let measured = measured_residual(&basis, &xs, p);
            assert!(close(basis.residual_energy, measured, 1e-3, 1e-5 * total), "{shape:?}: measured {measured}");
        }
    }

    #[test]
    fn both_gram_sides_give_the_same_subspace() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (c, p, n) = (6, 4, 2);
        let xs = low_rank_group(&mut rng, c, p, n, 3, 0.05);
        let g = Group { xs: &views(&xs), c, p };
        let total = xs.iter().map(|x| energy(x)).sum();
        let policy = RankPolicy::Fixed(3);
        let by_channels = exact_basis(&g, policy, total, 3, GramSide::Channels).unwrap();
        let by_positions = exact_basis(&g, policy, total, 3, GramSide::Positions).unwrap();
        let projector = |b: &Basis, i: usize, j: usize| (0..3).map(|t| b.u[i * 3 + t] * b.u[j * 3 + t]).sum::<f32>();
        for (i, j) in (0..c).flat_map(|i| (0..c).map(move |j| (i, j))) {
            assert!((projector(&by_channels, i, j) - projector(&by_positions, i, j)).abs() < 1e-4);
        }
        assert!(close(by_channels.residual_energy, by_positions.residual_energy, 1e-3, 1e-6 * total));
    }

    #[test]
    fn fast_tracks_exact_on_decaying_spectrum() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let sigmas: Vec<f64> = (0..12).map(|i| 10.0 * 0.5f64.powi(i)).collect();
        // The last two groups are large enough for a sampled basis.
        let shapes = [(64, 256, 1, 4), (48, 8, 4, 6), (64, 4, 3, 5), (16, 64, 2, 3), (40, 3, 2, 2)];
        let sampled = [(32, 256, 16, 4), (24, 1024, 8, 3)];
        assert!(sampled.iter().all(|&(_, p, n, r)| basis_samples(Subspace::Fast, RankPolicy::Fixed(r), n, p) < n));
        for (c, p, n, r) in shapes.into_iter().chain(sampled) {
            let xs = spectral_group(&mut rng, c, p, n, &sigmas, 1e-3);
            let exact = find_basis(&views(&xs), c, p, RankPolicy::Fixed(r), Subspace::Exact, &mut rng);
            let fast = find_basis(&views(&xs), c, p, RankPolicy::Fixed(r), Subspace::Fast, &mut rng);
            assert_eq!(fast.rank, r);
            assert_orthonormal(&fast);
            let tol = 1e-3 * exact.total_energy;
            // What the basis leaves of the whole group, sampled or not.
            let measured = measured_residual(&fast, &xs, p);
            assert!(close(measured, exact.residual_energy, 0.05, tol), "{fast:?}: {measured} vs {exact:?}");
            if basis_samples(Subspace::Fast, RankPolicy::Fixed(r), n, p) == n {
                assert!(close(fast.residual_energy, measured, 1e-3, 1e-5 * exact.total_energy));
            } else {
                // The energies are the sampled quarter's.
                assert!(fast.total_energy < 0.5 * exact.total_energy, "{fast:?} vs {exact:?}");
            }
            if (c, p) == (64, 256) {
                assert!(fast.macs < exact.macs, "fast costs {} vs exact {}", fast.macs, exact.macs);
            }
        }
    }

    #[test]
    fn energy_policy_picks_smallest_sufficient_rank() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for method in [Subspace::Exact, Subspace::Fast] {
            for _ in 0..6 {
                let (c, p, n) = (rng.random_range(4..40), rng.random_range(2..30), rng.random_range(1..4));
                let rank = rng.random_range(2..6);
                let xs = low_rank_group(&mut rng, c, p, n, rank, 0.1);
                let tau = rng.random_range(0.02..0.3);
                let policy = RankPolicy::Energy { tau, max_rank: 8 };
                let basis = find_basis(&views(&xs), c, p, policy, method, &mut rng);
                let total = basis.total_energy;
                assert!(basis.rank <= 8);
                assert!(measured_residual(&basis, &xs, p) <= tau * total * 1.001 || basis.rank == 8);
                if basis.rank > 0 {
                    let fewer = RankPolicy::Fixed(basis.rank - 1);
                    let smaller = find_basis(&views(&xs), c, p, fewer, Subspace::Exact, &mut rng);
                    assert!(measured_residual(&smaller, &xs, p) > tau * total, "rank - 1 already meets tau");
                }
            }
            // A tau no rank can meet stops at max_rank.
            let xs = low_rank_group(&mut rng, 20, 10, 1, 10, 0.5);
            let policy = RankPolicy::Energy { tau: 1e-9, max_rank: 3 };
            assert_eq!(find_basis(&views(&xs), 20, 10, policy, method, &mut rng).rank, 3);
        }
    }

    #[test]
    fn fixed_rank_is_capped_and_groups_share_a_basis() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for method in [Subspace::Exact, Subspace::Fast] {
            for (c, p, n, cap) in [(5, 3, 1, 3), (3, 10, 1, 3), (7, 2, 2, 4)] {
                let xs = low_rank_group(&mut rng, c, p, n, 2, 0.3);
                assert_eq!(find_basis(&views(&xs), c, p, RankPolicy::Fixed(100), method, &mut rng).rank, cap);
            }
            let (c, p) = (12, 9);
            let xs = low_rank_group(&mut rng, c, p, 4, 3, 0.2);
            let basis = find_basis(&views(&xs), c, p, RankPolicy::Fixed(3), method, &mut rng);
            let total: f64 = xs.iter().map(|x| energy(x)).sum();
            assert!(close(basis.total_energy, total, 1e-9, 0.0));
            assert!(close(basis.residual_energy, measured_residual(&basis, &xs, p), 1e-3, 1e-6 * total));
            // One sample alone is fitted at least as well by its own basis as by the group's.
            let own = find_basis(&[xs[0].as_slice()], c, p, RankPolicy::Fixed(3), Subspace::Exact, &mut rng);
            assert!(own.residual_energy <= measured_residual(&basis, &xs[..1], p) * 1.001);
        }
    }

    #[test]
    fn fast_coordinates_are_the_splits_projection() {
        // Shapes with one sample and with several (side by side when the maps are short), ranks
        // from 1 to 8, random data (flat spectrum) and a decaying spectrum; plus the energy policy.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let sigmas: Vec<f64> = (0..12).map(|i| 10.0 * 0.6f64.powi(i)).collect();
        for (c, p, n, r) in
            [(64, 256, 1, 4), (48, 8, 4, 6), (64, 4, 3, 1), (16, 200, 3, 3), (512, 4, 8, 8), (3, 64, 2, 2)]
        {
            for spectral in [false, true] {
                let xs: Vec<Vec<f32>> = if spectral {
                    spectral_group(&mut rng, c, p, n, &sigmas, 1e-2)
                } else {
                    (0..n).map(|_| gauss(&mut rng, c * p, 1.0)).collect()
                };
                for policy in [RankPolicy::Fixed(r), RankPolicy::Energy { tau: 0.2, max_rank: r }] {
                    let (basis, v) =
                        find_basis_and_coordinates(&views(&xs), c, p, policy, Subspace::Fast, &mut rng).unwrap();
                    let v = v.expect("the fast subspace gives coordinates");
                    let rp = basis.rank * p;
                    assert_eq!(v.len(), n * rp);
                    for (b, x) in xs.iter().enumerate() {
                        let what = format!("c {c} p {p} n {n} {policy:?} spectral {spectral} sample {b}");
                        let (want_v, want_residual) = split(&basis, x, p);
                        let scale = energy(x).sqrt() / (c * p) as f64 + 1e-30;
                        let v_b = &v[b * rp..(b + 1) * rp];
                        for (i, (&got, &want)) in v_b.iter().zip(&want_v).enumerate() {
                            assert!(
                                f64::from((got - want).abs()) <= 1e-3 * scale * (c as f64).sqrt(),
                                "{what}: v[{i}] {got} vs {want} scale {scale}"
                            );
                        }
                        let mut residual = vec![f32::NAN; x.len()];
                        let got_energy = residual_into(&basis, x, p, v_b, &mut residual);
                        let err: Vec<f32> = residual.iter().zip(&want_residual).map(|(a, b)| a - b).collect();
                        assert!(energy(&err).sqrt() <= 1e-4 * energy(x).sqrt(), "{what}: residual");
                        assert!(close(got_energy, energy(&residual), 1e-9, 1e-30), "{what}: energy");
                    }
                }
            }
        }
        // The exact subspace has no coordinates to give.
        let x = gauss(&mut rng, 4 * 9, 1.0);
        let (_, v) = find_basis_and_coordinates(&[&x], 4, 9, RankPolicy::Fixed(2), Subspace::Exact, &mut rng).unwrap();
        assert!(v.is_none());
    }

    #[test]
    fn degenerate_inputs_stay_finite() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for method in [Subspace::Exact, Subspace::Fast] {
            // All zeros, on both Gram sides: fixed rank keeps its size with a valid basis, energy gives 0.
            for (c, p) in [(6, 5), (9, 2)] {
                let zeros = vec![0.0f32; c * p];
                let basis = find_basis(&[&zeros], c, p, RankPolicy::Fixed(2), method, &mut rng);
                assert!(basis.u.iter().all(|v| v.is_finite()) && basis.residual_energy == 0.0);
                assert_orthonormal(&basis);
                let policy = RankPolicy::Energy { tau: 0.1, max_rank: 4 };
                assert_eq!(find_basis(&[&zeros], c, p, policy, method, &mut rng).rank, 0);
            }
            // C = 1 and rank = C: a full basis leaves nothing.
            for (c, p) in [(1, 7), (4, 8), (5, 5)] {
                let x = gauss(&mut rng, c * p, 1.0);
                let basis = find_basis(&[&x], c, p, RankPolicy::Fixed(c), method, &mut rng);
                assert_eq!(basis.rank, c);
                assert_orthonormal(&basis);
                assert!(measured_residual(&basis, std::slice::from_ref(&x), p) < 1e-8 * energy(&x));
                assert_eq!(basis.residual_energy, 0.0);
            }
            let x = gauss(&mut rng, 12, 1.0);
            let basis = find_basis(&[&x], 4, 3, RankPolicy::Fixed(0), method, &mut rng);
            assert_eq!((basis.rank, split(&basis, &x, 3).1), (0, x.clone()));
            assert!(close(basis.residual_energy, energy(&x), 1e-12, 0.0));
        }
    }

    /// `cargo test --release -p trustsplit-schemes --lib lowrank -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (c, p, n, r) in [(64, 1024, 1, 4), (512, 4, 1, 32), (512, 4, 32, 32), (3, 1024, 1, 2)] {
            let xs = low_rank_group(&mut rng, c, p, n, 8, 0.1);
            for method in [Subspace::Exact, Subspace::Fast] {
                let start = std::time::Instant::now();
                let reps = 10;
                let mut basis = None;
                for _ in 0..reps {
                    basis = Some(find_basis(&views(&xs), c, p, RankPolicy::Fixed(r), method, &mut rng));
                }
                let b = basis.expect("ran");
                let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(reps);
                println!(
                    "C={c} P={p} n={n} r={r} {method:?}: {us:.0} us, {} macs, residual {:.4}",
                    b.macs,
                    b.residual_energy / b.total_energy
                );
            }
        }
    }
}
