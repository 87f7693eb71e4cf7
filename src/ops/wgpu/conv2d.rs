//! The convolution and both its gradients on wgpu: one tiled implicit GEMM
//! (`kernels/wgsl/conv2d.wgsl`) specialised per product by its `MODE` override constant.

use candle_core::CpuStorage;

use super::{groups_for, run_one, shader, word, Job, Pass, Shader};
use crate::ops::conv2d::{Geometry, Product};
use crate::Result;

static SHADER: Shader = shader!("conv2d");

/// Output rows and columns of a workgroup's tile (`TILE` in the shader).
const TILE: usize = 64;

/// Runs `product` of the convolution `g` on its two inputs, in the order the variant names.
pub(crate) fn run(op: &'static str, g: &Geometry, product: Product, src1: &[f32], src2: &[f32]) -> Result<CpuStorage> {
    let (m, n, _) = product.gemm(g);
    let mode = match product {
        Product::Forward => 0,
        Product::InputGrad => 1,
        Product::WeightGrad => 2,
    };
    let sizes = g.kernel_sizes(product);
    let params = sizes
        .iter()
        .map(|&(what, v)| word(op, what, v))
        .collect::<Result<Vec<u32>>>()?;
    let constants = [("MODE", f64::from(mode))];
    run_one(&Job {
        op,
        params: &params,
        inputs: &[(1, src1), (2, src2)],
        output: (3, m * n),
        scratch: &[],
        passes: &[Pass {
            constants: &constants,
            ..SHADER.pass(
                "conv2d_gemm_f32",
                groups_for(op, m.div_ceil(TILE) * n.div_ceil(TILE), 1)?,
            )
        }],
    })
}
