//! The convolution and both its gradients on wgpu: one tiled implicit GEMM
//! (`kernels/wgsl/conv2d.wgsl`) specialised per product by its `MODE` override constant.

use candle_core::CpuStorage;

use super::{groups_for, run_one, shader, word, Job, Pass, Shader, Slot};
use crate::ops::conv2d::Geometry;
use crate::Result;

static SHADER: Shader = shader!("conv2d");

/// Output rows and columns of a workgroup's tile (`TILE` in the shader).
const TILE: usize = 64;

/// Which product of the convolution to compute.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Product {
    /// `y` from `(x, w)`.
    Forward,
    /// `dx` from `(dy, w)`.
    InputGrad,
    /// `dw` from `(x, dy)`.
    WeightGrad,
}

/// Runs `product` of the convolution `g` on its two inputs, in the order the variant names.
pub(crate) fn run(op: &'static str, g: &Geometry, product: Product, src1: &[f32], src2: &[f32]) -> Result<CpuStorage> {
    let (kk, l, hw) = (g.kh * g.kw, g.ho * g.wo, g.h * g.w);
    let (m, n, k, mode) = match product {
        Product::Forward => (g.c_out, g.b * l, g.c_in * kk, 0),
        Product::InputGrad => (g.c_in, g.b * hw, g.c_out * kk, 1),
        Product::WeightGrad => (g.c_out, g.c_in * kk, g.b * l, 2),
    };
    let sizes = [
        ("batch", g.b),
        ("c_in", g.c_in),
        ("h", g.h),
        ("w", g.w),
        ("c_out", g.c_out),
        ("kh", g.kh),
        ("kw", g.kw),
        ("ho", g.ho),
        ("wo", g.wo),
        ("stride", g.stride),
        ("pad", g.pad),
        ("m", m),
        ("n", n),
        ("k", k),
    ];
    let params = sizes
        .iter()
        .map(|&(what, v)| word(op, what, v))
        .collect::<Result<Vec<u32>>>()?;
    let constants = [("MODE", f64::from(mode))];
    run_one(&Job {
        op,
        params: &params,
        slots: &[(1, Slot::In(src1)), (2, Slot::In(src2)), (3, Slot::Out(m * n))],
        passes: &[Pass {
            constants: &constants,
            ..SHADER.pass(
                "conv2d_gemm_f32",
                groups_for(op, m.div_ceil(TILE) * n.div_ceil(TILE), 1)?,
            )
        }],
    })
}
