"""PyTorch side of `diffalign bench --suite dpo-step`: one Diffusion-DPO step on one pair (policy
forward + backward, reference forward, on the pair's batch of 2), with the same options, so that
time and peak memory can be measured in one script on the same machine. Not run by CI.

    /path/to/venv/bin/python benches/pytorch_dpo_step.py CONFIG [--lora RANK]
        [--gradient-checkpointing] [--dtype f32|bf16|f16] [--latent-size 64] [--repeats 1]

With --lora this is diffusers' LoRA Diffusion-DPO step (examples/research_projects/diffusion_dpo):
a PEFT adapter (gaussian init, alpha = rank, to_q/to_k/to_v/to_out.0) on the frozen UNet in
--dtype, adapter weights in f32, and the reference pass with the adapters disabled on the same
UNet. Without it, every weight trains (in --dtype) against a second frozen UNet.
"""

import argparse
import json

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from bench_common import DEVICE, median_secs, report_peak_memory, setup

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--lora", type=int)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", default="f32", choices=DTYPES)
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    setup()
    torch.manual_seed(0)
    dtype = DTYPES[a.dtype]
    with open(a.config) as f:
        config = json.load(f)
    unet = UNet2DConditionModel.from_config(config)
    if a.lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(dtype=dtype)
        unet.add_adapter(
            LoraConfig(
                r=a.lora,
                lora_alpha=a.lora,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        for q in unet.parameters():
            if q.requires_grad:
                q.data = q.data.float()
        reference = None
    else:
        unet.to(dtype=dtype)
        reference = UNet2DConditionModel.from_config(config).to(dtype=dtype).requires_grad_(False)
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [q for q in unet.parameters() if q.requires_grad]
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s, c = a.latent_size, unet.config.in_channels
    lw, ll, noise = torch.randn(1, c, s, s), torch.randn(1, c, s, s), torch.randn(1, c, s, s)
    ctx = torch.randn(1, a.text_len, unet.config.cross_attention_dim)
    tt = torch.tensor([500])
    added = None
    if unet.config.addition_embed_type == "text_time":
        # SDXL layouts: pooled text embeddings and the time ids of a square image.
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        px = float(s * 8)
        added = {
            "text_embeds": torch.randn(2, pooled).to(dtype),
            "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * 2).to(dtype),
        }

    def dpo_step():
        for q in trainable:
            q.grad = None
        x0 = torch.cat([lw, ll])
        n2 = noise.repeat(2, 1, 1, 1)
        t2 = tt.repeat(2)
        xt = sched.add_noise(x0, n2, t2).to(dtype)
        c2 = ctx.repeat(2, 1, 1).to(dtype)
        pred = unet(xt, t2, c2, added_cond_kwargs=added).sample
        mse = (pred.float() - n2.float()).pow(2).mean(dim=[1, 2, 3])
        with torch.no_grad():
            if reference is None:
                unet.disable_adapters()
                rpred = unet(xt, t2, c2, added_cond_kwargs=added).sample
                unet.enable_adapters()
            else:
                rpred = reference(xt, t2, c2, added_cond_kwargs=added).sample
            rmse = (rpred.float() - n2.float()).pow(2).mean(dim=[1, 2, 3])
        inside = -0.5 * 5000 * ((mse[0] - mse[1]) - (rmse[0] - rmse[1]))
        loss = -torch.nn.functional.logsigmoid(inside).mean()
        loss.backward()

    secs = median_secs(a.repeats, dpo_step)
    params = sum(q.numel() for q in unet.parameters())
    shape = (
        f"{params} params, DPO step ({f'LoRA rank {a.lora}' if a.lora else 'every weight'}, {a.dtype}): "
        f"one pair, latents {c}x{s}x{s}, text {a.text_len}x{unet.config.cross_attention_dim}, "
        f"recompute {str(a.gradient_checkpointing).lower()}"
    )
    print(json.dumps({"bench": "dpo_step", "shape": shape, "median_s": secs, "threads": torch.get_num_threads(), "impl": f"pytorch {torch.__version__}", "device": DEVICE}))
    report_peak_memory()


if __name__ == "__main__":
    main()
