//! The backend contract of a fused op: a [`Kernel`] says what it computes on each backend, and
//! [`Fused`] makes it a candle custom op that picks the backend the same way for every op. For
//! CPU tensors: wgpu or the CUDA emulator when that backend is installed and the inputs are
//! f32, else the CPU kernel (f32 or f64; bf16 and f16 computed in f32); CUDA tensors take the
//! CUDA kernel.

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use candle_core::DType;
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::cpu::{dispatch_real, narrowed, slice, widened, Real};

/// A fused op on `N` inputs, each backend's part of it.
pub(crate) trait Kernel<const N: usize>: Send + Sync {
    /// The op's name, in errors.
    const NAME: &'static str;

    /// The sizes of one call, as the backends take them.
    type Call;

    /// The call and the output shape, checked against the inputs' layouts.
    fn call(&self, layouts: [&Layout; N]) -> Result<(Self::Call, Shape)>;

    /// The CPU kernel on contiguous inputs.
    fn cpu<T: Real>(&self, call: &Self::Call, inputs: [&[T]; N]) -> Result<Vec<T>>;

    /// The WGSL kernel (f32).
    #[cfg(feature = "wgpu")]
    fn wgpu(&self, call: &Self::Call, inputs: [&[f32]; N]) -> crate::Result<CpuStorage>;

    /// The CUDA kernels' job on inputs held as `I` (device storages, or host slices for the
    /// emulator), in `dtype`. Ops whose job needs more than the inputs (attention's mask)
    /// override [`Kernel::cuda_emu`] and [`Kernel::cuda`] instead.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn cuda_job<I>(&self, _call: &Self::Call, _dtype: DType, _inputs: [I; N]) -> crate::Result<super::cuda::Job<I>> {
        Err(super::cuda::op_error(Self::NAME, "no CUDA job for this op"))
    }

    /// The CUDA kernels on the emulator (f32); `None` leaves the call to the CPU kernel.
    #[cfg(feature = "cuda-emu")]
    fn cuda_emu(&self, call: &Self::Call, inputs: [&[f32]; N]) -> crate::Result<Option<CpuStorage>> {
        self.cuda_job(call, DType::F32, inputs)
            .and_then(super::cuda::emu::run)
            .map(Some)
    }

    /// The CUDA kernels on candle's CUDA device, in the inputs' dtype.
    #[cfg(feature = "cuda")]
    fn cuda(&self, call: &Self::Call, inputs: [super::cuda::device::Input<'_>; N]) -> Result<CudaStorage> {
        let job = self
            .cuda_job(call, inputs[0].0.dtype(), inputs)
            .map_err(candle_core::Error::wrap)?;
        super::cuda::device::run(job)
    }

    /// The gradients of the inputs from the forward output `res` and its gradient `grad`;
    /// backward kernels, applied without a backward of their own, keep the default (none).
    fn backward(&self, _inputs: [&Tensor; N], _res: &Tensor, _grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// A [`Kernel`] as a candle custom op (`CustomOp1`, `CustomOp2` or `CustomOp3` by its arity).
pub(crate) struct Fused<K>(pub K);

/// `cpu_fwd` of every fused op: the installed GPU backend for f32 where it takes the call, else
/// the CPU kernel.
fn cpu_fwd<K: Kernel<N>, const N: usize>(
    kernel: &K,
    inputs: [(&CpuStorage, &Layout); N],
) -> Result<(CpuStorage, Shape)> {
    let (call, shape) = kernel.call(inputs.map(|(_, l)| l))?;
    let first = inputs[0].0;
    #[cfg(any(feature = "wgpu", feature = "cuda-emu"))]
    if matches!(first, CpuStorage::F32(_)) {
        let backend = super::backend();
        #[cfg(feature = "wgpu")]
        if backend == super::Backend::Wgpu {
            let out = kernel.wgpu(&call, slices(K::NAME, inputs)?);
            return out.map(|out| (out, shape)).map_err(candle_core::Error::wrap);
        }
        #[cfg(feature = "cuda-emu")]
        if backend == super::Backend::CudaEmu {
            if let Some(out) = kernel
                .cuda_emu(&call, slices(K::NAME, inputs)?)
                .map_err(candle_core::Error::wrap)?
            {
                return Ok((out, shape));
            }
        }
    }
    let out = match first {
        // Half types compute in f32: the inputs are widened for this call only and the output
        // rounded back, so no f32 copy stays alive in the graph.
        CpuStorage::BF16(_) | CpuStorage::F16(_) => {
            let wide = inputs
                .iter()
                .map(|(s, l)| widened::<f32>(K::NAME, s, l))
                .collect::<Result<Vec<_>>>()?;
            let refs: [&[f32]; N] = std::array::from_fn(|i| &wide[i][..]);
            narrowed(first, kernel.cpu::<f32>(&call, refs)?)
        }
        _ => dispatch_real!(K::NAME, first, T => {
            T::to_cpu_storage_owned(kernel.cpu::<T>(&call, slices(K::NAME, inputs)?)?)
        }),
    };
    Ok((out, shape))
}

/// The contiguous slices of `inputs`, as `T`.
fn slices<'a, T: candle_core::WithDType, const N: usize>(
    op: &str,
    inputs: [(&'a CpuStorage, &Layout); N],
) -> Result<[&'a [T]; N]> {
    let mut out = [&[][..]; N];
    for (slot, (s, l)) in out.iter_mut().zip(inputs) {
        *slot = slice(op, s, l)?;
    }
    Ok(out)
}

/// `cuda_fwd` of every fused op.
#[cfg(feature = "cuda")]
fn cuda_fwd<K: Kernel<N>, const N: usize>(
    kernel: &K,
    inputs: [super::cuda::device::Input<'_>; N],
) -> Result<(CudaStorage, Shape)> {
    let (call, shape) = kernel.call(inputs.map(|(_, l)| l))?;
    Ok((kernel.cuda(&call, inputs)?, shape))
}

/// Implements the candle custom-op trait `$op` of arity `$n` for [`Fused`], inputs named by
/// `$storage`, `$layout` and `$tensor`.
macro_rules! fused_custom_op {
    ($op:ident, $n:literal, $grads:ty, $(($storage:ident, $layout:ident, $tensor:ident)),+) => {
        impl<K: Kernel<$n>> candle_core::$op for Fused<K> {
            fn name(&self) -> &'static str {
                K::NAME
            }

            fn cpu_fwd(&self, $($storage: &CpuStorage, $layout: &Layout),+) -> Result<(CpuStorage, Shape)> {
                cpu_fwd(&self.0, [$(($storage, $layout)),+])
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(&self, $($storage: &CudaStorage, $layout: &Layout),+) -> Result<(CudaStorage, Shape)> {
                cuda_fwd(&self.0, [$(($storage, $layout)),+])
            }

            fn bwd(&self, $($tensor: &Tensor,)+ res: &Tensor, grad: &Tensor) -> Result<$grads> {
                let [$($tensor),+] = self.0.backward([$($tensor),+], res, grad)?;
                Ok(($($tensor),+))
            }
        }
    };
}

fused_custom_op!(CustomOp1, 1, Option<Tensor>, (s1, l1, t1));
fused_custom_op!(
    CustomOp2,
    2,
    (Option<Tensor>, Option<Tensor>),
    (s1, l1, t1),
    (s2, l2, t2)
);
fused_custom_op!(
    CustomOp3,
    3,
    (Option<Tensor>, Option<Tensor>, Option<Tensor>),
    (s1, l1, t1),
    (s2, l2, t2),
    (s3, l3, t3)
);
