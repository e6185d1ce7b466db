//! The model zoo: LeNet-5, LeNet (the variant CryptGPU, Falcon and Piranha benchmark), AlexNet
//! (CIFAR variant), VGG 11/13/16/19 with and without batch-norm, ResNet-18/34 (CIFAR variant).
//! Kaiming-normal initialisation from a seeded ChaCha RNG. A name with the suffix `-avgpool`
//! (`lenet-avgpool`, `vgg16-avgpool`) is the model with every max-pool replaced by an average pool
//! of the same window, as CryptGPU's networks have it (`--pool avg` on the command line).

use crate::layers::{BatchNorm, Conv2d, Layer, Linear, Pool, Residual};
use crate::model::Model;
use crate::tensor::{from_vec, zeros};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Every model name `build` accepts.
pub const MODEL_NAMES: &[&str] = &[
    "lenet5", "lenet", "alexnet", "vgg11", "vgg11-bn", "vgg13", "vgg13-bn", "vgg16", "vgg16-bn", "vgg19", "vgg19-bn",
    "resnet18", "resnet34",
];

/// The square input size a model is designed for, if it needs one (inputs are padded to it).
pub fn required_input_size(name: &str) -> Option<usize> {
    match name {
        "lenet5" | "lenet" => None,
        _ if name.ends_with(AVG_POOL_SUFFIX) => required_input_size(&name[..name.len() - AVG_POOL_SUFFIX.len()]),
        _ => Some(32),
    }
}

/// The suffix that asks for average instead of max pooling.
pub const AVG_POOL_SUFFIX: &str = "-avgpool";

/// Whether `build` knows `name` (a zoo name, maybe with [`AVG_POOL_SUFFIX`]).
pub fn is_known(name: &str) -> bool {
    MODEL_NAMES.contains(&name.strip_suffix(AVG_POOL_SUFFIX).unwrap_or(name))
}

/// Builds a freshly initialised model for `input` (`C x H x W`) and `num_classes` classes.
pub fn build(name: &str, input: &[usize], num_classes: usize, seed: u64) -> Result<Model, String> {
    if input.len() != 3 {
        return Err(format!("models take C x H x W inputs, got {input:?}"));
    }
    if let Some(base) = name.strip_suffix(AVG_POOL_SUFFIX) {
        let mut model = build(base, input, num_classes, seed)?;
        if !model.layers.iter().any(|l| matches!(l, Layer::MaxPool(_))) {
            return Err(format!("model {base} has no max-pooling to replace with average pooling"));
        }
        let layers = model.layers.drain(..).map(|l| if let Layer::MaxPool(p) = l { Layer::AvgPool(p) } else { l });
        return Model::new(name, input, layers.collect());
    }
    let mut b = Builder { rng: ChaCha8Rng::seed_from_u64(seed), channels: input[0] };
    let layers = match name {
        "lenet5" => b.lenet5(input, num_classes)?,
        "lenet" => b.lenet(input, num_classes)?,
        "alexnet" => b.alexnet(input, num_classes)?,
        "resnet18" => b.resnet(&[2, 2, 2, 2], input, num_classes)?,
        "resnet34" => b.resnet(&[3, 4, 6, 3], input, num_classes)?,
        _ => {
            let (depth, bn) = match name.strip_suffix("-bn") {
                Some(d) => (d, true),
                None => (name, false),
            };
            let cfg = vgg_config(depth).ok_or_else(|| unknown(name))?;
            b.vgg(cfg, bn, input, num_classes)?
        }
    };
    Model::new(name, input, layers)
}

fn unknown(name: &str) -> String {
    format!("unknown model '{name}'; choose one of: {}", MODEL_NAMES.join(", "))
}

/// Channel counts of VGG's convolutions; 0 marks a 2x2 max-pool.
fn vgg_config(depth: &str) -> Option<&'static [usize]> {
    Some(match depth {
        "vgg11" => &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0],
        "vgg13" => &[64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0],
        "vgg16" => &[64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0],
        "vgg19" => &[64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0],
        _ => return None,
    })
}

struct Builder {
    rng: ChaCha8Rng,
    /// Channels flowing into the next convolution.
    channels: usize,
}

impl Builder {
    /// Kaiming-normal weights (fan-in, ReLU gain): std = sqrt(2 / fan_in).
    fn kaiming(&mut self, shape: &[usize], fan_in: usize) -> crate::Tensor {
        let normal = Normal::new(0.0f32, (2.0 / fan_in as f32).sqrt()).expect("finite std");
        let n = shape.iter().product();
        from_vec(shape, (0..n).map(|_| normal.sample(&mut self.rng)).collect())
    }

    fn conv(&mut self, out: usize, k: usize, stride: usize, padding: usize, bias: bool) -> Layer {
        let cin = self.channels;
        self.channels = out;
        Layer::Conv2d(Conv2d {
            weight: self.kaiming(&[out, cin, k, k], cin * k * k),
            bias: bias.then(|| zeros(&[out])),
            stride,
            padding,
        })
    }

    fn linear(&mut self, inp: usize, out: usize) -> Layer {
        Layer::Linear(Linear { weight: self.kaiming(&[out, inp], inp), bias: Some(zeros(&[out])) })
    }

    fn max_pool(k: usize) -> Layer {
        Layer::MaxPool(Pool { kernel: k, stride: k, padding: 0 })
    }

    /// Flatten, then a linear classifier sized from the feature shape so far.
    fn classifier(
        &mut self,
        features: &[Layer],
        input: &[usize],
        hidden: &[usize],
        classes: usize,
    ) -> Result<Vec<Layer>, String> {
        let shape = crate::layers::shape_through(features, input)?;
        let mut width: usize = shape.iter().product();
        let mut out = vec![Layer::Flatten];
        for &h in hidden {
            out.push(self.linear(width, h));
            out.push(Layer::Relu);
            width = h;
        }
        out.push(self.linear(width, classes));
        Ok(out)
    }

    fn lenet5(&mut self, input: &[usize], classes: usize) -> Result<Vec<Layer>, String> {
        let mut f = vec![self.conv(6, 5, 1, 2, true), Layer::Relu, Self::max_pool(2)];
        f.extend([self.conv(16, 5, 1, 0, true), Layer::Relu, Self::max_pool(2)]);
        let head = self.classifier(&f, input, &[120, 84], classes)?;
        f.extend(head);
        Ok(f)
    }

    /// The LeNet of CryptGPU, Falcon and Piranha: conv 20@5x5, pool, conv 50@5x5, pool, FC 500, FC classes.
    fn lenet(&mut self, input: &[usize], classes: usize) -> Result<Vec<Layer>, String> {
        let mut f = vec![self.conv(20, 5, 1, 0, true), Layer::Relu, Self::max_pool(2)];
        f.extend([self.conv(50, 5, 1, 0, true), Layer::Relu, Self::max_pool(2)]);
        let head = self.classifier(&f, input, &[500], classes)?;
        f.extend(head);
        Ok(f)
    }

    fn alexnet(&mut self, input: &[usize], classes: usize) -> Result<Vec<Layer>, String> {
        let mut f = vec![self.conv(64, 11, 4, 5, true), Layer::Relu, Self::max_pool(2)];
        f.extend([self.conv(192, 5, 1, 2, true), Layer::Relu, Self::max_pool(2)]);
        f.extend([self.conv(384, 3, 1, 1, true), Layer::Relu]);
        f.extend([self.conv(256, 3, 1, 1, true), Layer::Relu]);
        f.extend([self.conv(256, 3, 1, 1, true), Layer::Relu, Self::max_pool(2)]);
        let head = self.classifier(&f, input, &[], classes)?;
        f.extend(head);
        Ok(f)
    }

    fn vgg(&mut self, cfg: &[usize], bn: bool, input: &[usize], classes: usize) -> Result<Vec<Layer>, String> {
        let mut f = Vec::new();
        for &c in cfg {
            if c == 0 {
                f.push(Self::max_pool(2));
                continue;
            }
            // Batch-norm's shift makes a convolution bias redundant.
            f.push(self.conv(c, 3, 1, 1, !bn));
            if bn {
                f.push(Layer::BatchNorm(BatchNorm::new(c)));
            }
            f.push(Layer::Relu);
        }
        let head = self.classifier(&f, input, &[], classes)?;
        f.extend(head);
        Ok(f)
    }

    fn basic_block(&mut self, out: usize, stride: usize) -> Layer {
        let cin = self.channels;
        let main = vec![
            self.conv(out, 3, stride, 1, false),
            Layer::BatchNorm(BatchNorm::new(out)),
            Layer::Relu,
            self.conv(out, 3, 1, 1, false),
            Layer::BatchNorm(BatchNorm::new(out)),
        ];
        let shortcut = if stride != 1 || cin != out {
            self.channels = cin;
            vec![self.conv(out, 1, stride, 0, false), Layer::BatchNorm(BatchNorm::new(out))]
        } else {
            vec![]
        };
        Layer::Residual(Residual { main, shortcut })
    }

    fn resnet(&mut self, blocks: &[usize], input: &[usize], classes: usize) -> Result<Vec<Layer>, String> {
        let mut f = vec![self.conv(64, 3, 1, 1, false), Layer::BatchNorm(BatchNorm::new(64)), Layer::Relu];
        for (stage, &count) in blocks.iter().enumerate() {
            let width = 64 << stage;
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                f.push(self.basic_block(width, stride));
                f.push(Layer::Relu);
            }
        }
        // Global average pooling over whatever map size is left (4x4 for 32x32 inputs).
        let shape = crate::layers::shape_through(&f, input)?;
        f.push(Layer::AvgPool(Pool { kernel: shape[1], stride: shape[1], padding: 0 }));
        let head = self.classifier(&f, input, &[], classes)?;
        f.extend(head);
        Ok(f)
    }
}
