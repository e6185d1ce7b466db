//! PSNR and SSIM against scikit-image 0.26's values for the same images, and the PNG grid read
//! back.

use trustsplit_attacks::grid::write_png;
use trustsplit_attacks::metrics::{psnr, ssim};

/// Pseudo-random values in [0, 1) that numpy reproduces: frac(sin(i * 12.9898 + seed) * 43758.5453).
fn hash_image(n: usize, seed: f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = (i as f64 * 12.9898 + seed).sin() * 43758.5453;
            (v - v.floor()) as f32
        })
        .collect()
}

#[test]
fn psnr_and_ssim_match_scikit_image() {
    // a = img(3*11*9, 0); b = clip(a + 0.3 * (img(3*11*9, 1) - 0.5), 0, 1), float32;
    // structural_similarity(a, b, data_range=1, channel_axis=0) and peak_signal_noise_ratio.
    let a = hash_image(3 * 11 * 9, 0.0);
    let noise = hash_image(3 * 11 * 9, 1.0);
    let b: Vec<f32> = a.iter().zip(&noise).map(|(&x, &n)| (x + 0.3 * (n - 0.5)).clamp(0.0, 1.0)).collect();
    assert!((ssim(&a, &b, 3, 11, 9).unwrap() - 0.955304300078).abs() < 1e-6);
    assert!((psnr(&a, &b) - 21.681750307131).abs() < 1e-5);

    // s = 0.5 + 0.4 sin(x/4) cos(y/5) on 28 x 28; t = clip(0.9 s + 0.05 + 0.1 (g - 0.5), 0, 1).
    let g = hash_image(28 * 28, 2.0);
    let s: Vec<f32> = (0..28 * 28)
        .map(|k| (0.5 + 0.4 * ((k % 28) as f64 / 4.0).sin() * ((k / 28) as f64 / 5.0).cos()) as f32)
        .collect();
    let t: Vec<f32> = s.iter().zip(&g).map(|(&s, &g)| (0.9 * s + 0.05 + 0.1 * (g - 0.5)).clamp(0.0, 1.0)).collect();
    assert!((ssim(&s, &t, 1, 28, 28).unwrap() - 0.958915503401).abs() < 1e-6);
    assert!((psnr(&s, &t) - 29.609442937612).abs() < 1e-5);

    // An exact copy: SSIM 1 and the capped PSNR; unrelated images score far lower.
    assert!((ssim(&s, &s, 1, 28, 28).unwrap() - 1.0).abs() < 1e-12);
    assert!((psnr(&s, &s) - 100.0).abs() < 1e-9);
    assert!(ssim(&s, &g, 1, 28, 28).unwrap() < 0.1);
    assert!(ssim(&s, &t, 1, 6, 6).is_err() && ssim(&s, &t[..10], 1, 28, 28).is_err());
}

#[test]
fn the_grid_is_a_png_of_the_images() {
    let dir = std::env::temp_dir().join(format!("trustsplit-grid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("grid.png");
    let images: Vec<Vec<f32>> = (0..3).map(|s| hash_image(3 * 4 * 5, s as f64)).collect();
    write_png(&path, &[images.clone(), images[..2].to_vec()], 3, 4, 5).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height, info.color_type), (3 * 6 + 1, 2 * 5 + 1, png::ColorType::Rgb));
    // Row 1, image 2 (0-based 1, 1), pixel (2, 3), green channel.
    let (y, x) = (5 + 1 + 2, 6 + 1 + 3);
    let expected = (images[1][(4 + 2) * 5 + 3] * 255.0).round() as u8;
    assert_eq!(buf[(y * info.width as usize + x) * 3 + 1], expected);
    assert!(write_png(&path, &[images], 2, 4, 5).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
