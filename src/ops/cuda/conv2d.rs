//! The convolution and both its gradients (`kernels/cuda/conv2d.cu`): one tiled implicit GEMM
//! per product.

use candle_core::DType;

use super::{blocks_for, word, Arg, Job, Launch, Slot};
use crate::ops::conv2d::{Geometry, Product};
use crate::Result;

/// Output rows and columns of a block's tile (`CONV_TILE` in the kernel).
const TILE: usize = 64;

/// `product` of the convolution `g` from its two inputs, in the order the variant names.
pub(crate) fn job<I>(
    op: &'static str,
    dtype: DType,
    g: &Geometry,
    product: Product,
    src1: I,
    src2: I,
) -> Result<Job<I>> {
    let (m, n, _) = product.gemm(g);
    let name = match product {
        Product::Forward => "conv2d_fwd",
        Product::InputGrad => "conv2d_input_grad",
        Product::WeightGrad => "conv2d_weight_grad",
    };
    let mut args = vec![Arg::Buf(0, 0), Arg::Buf(1, 0), Arg::Buf(2, 0)];
    for (what, v) in g.kernel_sizes(product) {
        args.push(word(op, what, v)?);
    }
    Ok(Job {
        op,
        dtype,
        slots: vec![Slot::In(src1), Slot::In(src2), Slot::Out(m * n)],
        launches: vec![Launch {
            module: "conv2d",
            name,
            blocks: blocks_for(op, m.div_ceil(TILE) * n.div_ceil(TILE), 1)?,
            args,
        }],
    })
}
