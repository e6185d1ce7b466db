//! What the protocol tests share: random quantised operands and one op of each kind on random
//! shapes.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use trustsplit_cryptgpu::gemm::ConvShape;
use trustsplit_goten::ops::Op;
use trustsplit_goten::quant::Quantised;

pub fn quantised(rng: &mut ChaCha8Rng, n: usize) -> Quantised {
    Quantised { values: (0..n).map(|_| rng.random_range(-128i64..=127) as u64).collect(), exp: rng.random_range(-8..4) }
}

pub fn ops(rng: &mut ChaCha8Rng) -> Vec<Op> {
    let (n, k, m) = (rng.random_range(1..6), rng.random_range(1..40), rng.random_range(1..9));
    let conv = ConvShape {
        batch: rng.random_range(1..4),
        in_channels: rng.random_range(1..5),
        height: rng.random_range(5..10),
        width: rng.random_range(5..10),
        out_channels: rng.random_range(1..6),
        kernel: [1, 3, 5][rng.random_range(0..3)],
        stride: rng.random_range(1..3),
        padding: rng.random_range(0..2),
    };
    vec![
        Op::LinearForward { n, k, m },
        Op::LinearInputGrad { n, k, m },
        Op::LinearWeightGrad { n, k, m },
        Op::ConvForward(conv),
        Op::ConvInputGrad(conv),
        Op::ConvWeightGrad(conv),
    ]
}
