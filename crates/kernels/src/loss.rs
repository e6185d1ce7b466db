//! Softmax cross-entropy, averaged over the batch.

/// Result of [`softmax_cross_entropy`].
pub struct LossOutput {
    /// Mean negative log-likelihood over the batch.
    pub loss: f32,
    /// Number of samples whose largest logit is the label.
    pub correct: usize,
}

/// Mean cross-entropy of `softmax(logits)` (`n x classes`) against `labels`, and its gradient
/// with respect to the logits written into `dlogits` (`(softmax - onehot) / n`).
/// Panics if a label is out of range (callers validate labels when loading data).
pub fn softmax_cross_entropy(
    n: usize,
    classes: usize,
    logits: &[f32],
    labels: &[usize],
    dlogits: Option<&mut [f32]>,
) -> LossOutput {
    assert_eq!(logits.len(), n * classes, "softmax_cross_entropy: logits length");
    assert_eq!(labels.len(), n, "softmax_cross_entropy: labels length");
    let mut total = 0.0f64;
    let mut correct = 0;
    let mut grad = dlogits;
    if let Some(g) = grad.as_deref() {
        assert_eq!(g.len(), n * classes, "softmax_cross_entropy: gradient length");
    }
    for (i, row) in logits.chunks(classes).enumerate() {
        let label = labels[i];
        assert!(label < classes, "label {label} out of range for {classes} classes");
        let (argmax, max) = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (j, &v)| if v > bv { (j, v) } else { (bi, bv) });
        if argmax == label {
            correct += 1;
        }
        // Subtract the max so exp never overflows; accumulate in f64 for a stable log.
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let log_sum = sum.ln();
        total += log_sum - (row[label] - max) as f64;
        if let Some(g) = grad.as_deref_mut() {
            let g_row = &mut g[i * classes..(i + 1) * classes];
            for (j, (gv, &v)) in g_row.iter_mut().zip(row).enumerate() {
                let p = (((v - max) as f64) - log_sum).exp();
                let target = if j == label { 1.0 } else { 0.0 };
                *gv = ((p - target) / n as f64) as f32;
            }
        }
    }
    LossOutput { loss: (total / n.max(1) as f64) as f32, correct }
}
