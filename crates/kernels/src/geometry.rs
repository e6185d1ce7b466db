//! The shapes of one convolution, shared by the convolution kernels ([`crate::conv`]) and the
//! direct weight gradients ([`crate::thin_conv`]).

/// Shapes of one convolution: input `batch x in_channels x in_h x in_w`, weight
/// `out_channels x in_channels x kernel_h x kernel_w`, the same stride and zero padding on both axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    /// Checks that the geometry describes a non-empty output.
    pub fn validate(&self) -> Result<(), String> {
        if self.stride == 0 {
            return Err("convolution stride must be at least 1".into());
        }
        if self.kernel_h == 0 || self.kernel_w == 0 {
            return Err("convolution kernel must be at least 1x1".into());
        }
        let (ph, pw) = (self.in_h + 2 * self.padding, self.in_w + 2 * self.padding);
        if ph < self.kernel_h || pw < self.kernel_w {
            return Err(format!(
                "convolution kernel {}x{} is larger than the padded input {}x{}",
                self.kernel_h, self.kernel_w, ph, pw
            ));
        }
        Ok(())
    }
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.padding - self.kernel_h) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.padding - self.kernel_w) / self.stride + 1
    }
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.in_h * self.in_w
    }
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_h() * self.out_w()
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.patch_len()
    }
    /// Length of one unrolled patch: `in_channels * kernel_h * kernel_w`.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }
    /// Multiply-adds of the forward pass (the backward passes cost the same each).
    pub fn forward_macs(&self) -> u64 {
        (self.batch * self.out_channels * self.out_h() * self.out_w()) as u64 * self.patch_len() as u64
    }
    pub(crate) fn out_pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }
    /// A 1x1, stride-1, unpadded conv needs no unrolling: the input already is the patch matrix.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == 1 && self.padding == 0
    }
    pub(crate) fn check(&self) {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
    }
    /// The "transposed" geometry of a stride-1 convolution with a square kernel: a convolution
    /// from this one's output (`out_channels` channels, `out_h x out_w`) back to its input size,
    /// with padding `k - 1 - padding`. Its forward pass with the flipped, transposed weight is this
    /// one's input gradient, and its weight gradient (roles of input and output swapped) is this
    /// one's flipped. Both avoid unrolling (or rolling back) the side with more channels, which is
    /// what makes products with few output channels (AsymML's virtual channels) cheap.
    /// `None` where the identity does not hold or would not save work.
    pub(crate) fn transposed(&self) -> Option<ConvGeometry> {
        let k = self.kernel_h;
        let applies = self.stride == 1 && self.kernel_w == k && self.padding < k;
        (applies && self.out_channels < self.in_channels).then(|| ConvGeometry {
            in_channels: self.out_channels,
            out_channels: self.in_channels,
            in_h: self.out_h(),
            in_w: self.out_w(),
            padding: k - 1 - self.padding,
            ..*self
        })
    }
}
