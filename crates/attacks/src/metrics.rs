//! How close a reconstruction is to the original: PSNR and SSIM on pixel values in [0, 1].
//!
//! SSIM is the windowed form of Wang et al. (2004) as scikit-image computes it by default
//! (`structural_similarity` with `data_range=1`): 7 x 7 uniform windows, sample covariances,
//! K1 = 0.01, K2 = 0.03, the mean over the windows that lie inside the image, and over channels.
//! The tests hold values computed by scikit-image 0.26, so that our figures compare with the
//! papers' (which use it).

/// Peak signal-to-noise ratio in dB for values in [0, 1]. An exact reconstruction reads 100 dB
/// (the mean squared error is floored at 1e-10), so that figures stay finite in JSON.
pub fn psnr(original: &[f32], reconstruction: &[f32]) -> f64 {
    assert_eq!(original.len(), reconstruction.len(), "psnr of images of different sizes");
    let mse = original.iter().zip(reconstruction).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>()
        / original.len().max(1) as f64;
    10.0 * (1.0 / mse.max(1e-10)).log10()
}

/// The side of SSIM's square window.
pub const SSIM_WINDOW: usize = 7;

/// Mean structural similarity of two images laid out `channels x height x width`, values in
/// [0, 1]. Images smaller than the window are refused.
pub fn ssim(
    original: &[f32],
    reconstruction: &[f32],
    channels: usize,
    height: usize,
    width: usize,
) -> Result<f64, String> {
    let plane = height * width;
    if original.len() != channels * plane || reconstruction.len() != original.len() {
        return Err(format!(
            "ssim: images of {} and {} values, expected {channels} x {height} x {width}",
            original.len(),
            reconstruction.len()
        ));
    }
    if height < SSIM_WINDOW || width < SSIM_WINDOW {
        return Err(format!(
            "ssim: a {height} x {width} image is smaller than the {SSIM_WINDOW} x {SSIM_WINDOW} window"
        ));
    }
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let n = (SSIM_WINDOW * SSIM_WINDOW) as f64;
    let cov_norm = n / (n - 1.0);
    let mut total = 0.0;
    let mut windows = 0usize;
    for c in 0..channels {
        let x = &original[c * plane..(c + 1) * plane];
        let y = &reconstruction[c * plane..(c + 1) * plane];
        for top in 0..=height - SSIM_WINDOW {
            for left in 0..=width - SSIM_WINDOW {
                let (mut sx, mut sy, mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for i in top..top + SSIM_WINDOW {
                    for j in left..left + SSIM_WINDOW {
                        let (a, b) = (x[i * width + j] as f64, y[i * width + j] as f64);
                        sx += a;
                        sy += b;
                        sxx += a * a;
                        syy += b * b;
                        sxy += a * b;
                    }
                }
                let (ux, uy) = (sx / n, sy / n);
                let vx = cov_norm * (sxx / n - ux * ux);
                let vy = cov_norm * (syy / n - uy * uy);
                let vxy = cov_norm * (sxy / n - ux * uy);
                total += ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
                windows += 1;
            }
        }
    }
    Ok(total / windows as f64)
}
