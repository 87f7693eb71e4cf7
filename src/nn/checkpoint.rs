//! Activation recomputation ("gradient checkpointing") by block: a block's forward runs without
//! keeping its intermediate activations, and the backward pass runs it again, with a graph, to
//! get its gradients. Memory then grows with the number of blocks, not of ops, at the cost of one
//! extra forward (as `torch.utils.checkpoint`, which diffusers' `enable_gradient_checkpointing`
//! applies per resnet and transformer).
//!
//! candle has no hook for this, so a recomputed block is a custom op on its inputs. Its
//! parameters' gradients cannot be returned through a custom op with a fixed arity, so each
//! trainable parameter feeds a small "tap" op whose output (a zero scalar), summed with the
//! others, is an input of the block op: the graph then visits the block op first, which
//! recomputes and stores every parameter gradient, and each tap afterwards, which hands its
//! parameter's gradient to candle.
//! No parameter is copied. Off CPU the block runs plainly (no saving yet).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, Var};

use crate::Result;

/// Blocks recomputed in backward passes so far, in this process (a diagnostic).
static RECOMPUTED: AtomicUsize = AtomicUsize::new(0);

/// How many block recomputations backward passes have run in this process.
pub fn recomputed_blocks() -> usize {
    RECOMPUTED.load(Ordering::Relaxed)
}

/// A block body: `(input, optional second input) -> output`.
pub type BlockFn = dyn Fn(&Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync;

/// Per-block recomputation: the switch shared by a whole model and the block's own trainable
/// tensors. Cheap to clone.
#[derive(Clone)]
pub struct Recompute {
    enabled: Arc<AtomicBool>,
    params: Arc<Vec<Tensor>>,
}

impl std::fmt::Debug for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recompute")
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .field("params", &self.params.len())
            .finish()
    }
}

impl Recompute {
    /// The recomputation of the block built from `vb`: call it after the block's layers are
    /// built, so that its trainable tensors (weights or LoRA factors) are known.
    pub fn new(vb: &crate::weights::VarBuilder) -> Self {
        Recompute {
            enabled: vb.recompute_flag(),
            params: Arc::new(vb.trainable_under_prefix()),
        }
    }

    /// A recomputation that is always on, for a block whose trainable tensors are `params` (say
    /// a whole sampler step of a model, as AlignProp checkpoints them).
    pub fn always(params: Vec<Tensor>) -> Self {
        Recompute {
            enabled: Arc::new(AtomicBool::new(true)),
            params: Arc::new(params),
        }
    }

    /// Runs `f(block, a, b)`: plainly when recomputation is off or nothing needs a gradient (the
    /// block is then not cloned), otherwise keeping only the output and recomputing in the
    /// backward pass.
    pub fn run<M: Clone + Send + Sync + 'static>(
        &self,
        block: &M,
        f: fn(&M, &Tensor, Option<&Tensor>) -> Result<Tensor>,
        a: &Tensor,
        b: Option<&Tensor>,
    ) -> Result<Tensor> {
        let needs_grad = a.track_op() || b.is_some_and(|b| b.track_op()) || self.params.iter().any(|p| p.track_op());
        if !self.enabled.load(Ordering::Relaxed) || !needs_grad || !a.device().is_cpu() {
            return f(block, a, b);
        }
        let block = block.clone();
        let f: Arc<BlockFn> = Arc::new(move |a, b| f(&block, a, b));
        // The forward: the graph built through the parameters is dropped with `full`.
        let out = {
            let full = f(&a.detach(), b.map(|t| t.detach()).as_ref())?;
            full.detach().contiguous()?
        };
        let grads = Arc::new(Mutex::new(vec![None; self.params.len()]));
        let mut taps = Tensor::zeros((), DType::F32, a.device())?;
        for (i, p) in self.params.iter().enumerate() {
            if p.track_op() {
                let tap = p.apply_op1(Tap {
                    index: i,
                    grads: grads.clone(),
                })?;
                taps = (taps + tap)?;
            }
        }
        let b_arg = match b {
            Some(b) => b.clone(),
            None => Tensor::zeros((), a.dtype(), a.device())?,
        };
        let op = BlockOp {
            f,
            has_b: b.is_some(),
            out: Mutex::new(Some(out)),
            params: self.params.clone(),
            grads,
        };
        Ok(a.apply_op3(&b_arg, &taps, op)?)
    }
}

/// The recomputed block as an op on `(a, b, taps)`.
struct BlockOp {
    f: Arc<BlockFn>,
    has_b: bool,
    /// The forward result, handed over once to candle.
    out: Mutex<Option<Tensor>>,
    params: Arc<Vec<Tensor>>,
    grads: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "recomputed-block"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self
            .out
            .lock()
            .expect("block output lock")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("recomputed block: forward run twice".into()))?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) if layout.is_contiguous() && layout.start_offset() == 0 => {
                Ok((cpu.clone(), out.shape().clone()))
            }
            _ => Err(candle_core::Error::Msg(
                "recomputed block: expected a contiguous CPU output".into(),
            )),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        taps: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wrap = |e: crate::Error| candle_core::Error::Msg(format!("recomputed block: {e}"));
        let a_var = Var::from_tensor(&a.detach())?;
        let b_var = if self.has_b {
            Some(Var::from_tensor(&b.detach())?)
        } else {
            None
        };
        let out = (self.f)(a_var.as_tensor(), b_var.as_ref().map(|v| v.as_tensor())).map_err(wrap)?;
        let grads = (out * grad_res.detach())?.sum_all()?.backward()?;
        RECOMPUTED.fetch_add(1, Ordering::Relaxed);
        let mut stored = self.grads.lock().expect("block grads lock");
        for (slot, p) in stored.iter_mut().zip(self.params.iter()) {
            *slot = grads.get(p).cloned();
        }
        // candle expects a gradient for every tracked input, zeros included.
        let grad_of = |arg: &Tensor, var: Option<&Var>| -> candle_core::Result<Option<Tensor>> {
            if !arg.track_op() {
                return Ok(None);
            }
            match var.and_then(|v| grads.get(v.as_tensor())) {
                Some(g) => Ok(Some(g.clone())),
                None => Ok(Some(arg.zeros_like()?)),
            }
        };
        let grad_a = grad_of(a, Some(&a_var))?;
        let grad_b = grad_of(b, b_var.as_ref())?;
        let grad_taps = grad_of(taps, None)?;
        Ok((grad_a, grad_b, grad_taps))
    }
}

/// Passes the gradient of parameter `index`, computed by its block's backward, to candle.
struct Tap {
    index: usize,
    grads: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl CustomOp1 for Tap {
    fn name(&self) -> &'static str {
        "recomputed-block-tap"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, param: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = self.grads.lock().expect("block grads lock")[self.index].take();
        Ok(Some(match grad {
            Some(g) => g,
            None => param.zeros_like()?,
        }))
    }
}
