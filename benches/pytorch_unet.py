"""PyTorch side of `diffalign bench --suite unet`: the same UNet config, shapes and protocol
(random weights, batch 2, one warm-up, median of N), so both can be run in one session on the
same machine. Not run by CI.

    /path/to/venv/bin/python benches/pytorch_unet.py ../shared/bench/unet-mid/config.json [REPEATS]

BENCH_DEVICE=cuda runs it on the GPU (f32, TF32 off, as candle computes; each run synchronised).
"""

import json
import sys

import torch
from diffusers import UNet2DConditionModel

from bench_common import DEVICE, median_secs, report_peak_memory, setup


def main():
    config_path = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    torch.set_num_threads(2)
    setup()
    torch.manual_seed(0)
    with open(config_path) as f:
        config = json.load(f)
    unet = UNet2DConditionModel.from_config(config).float()
    params = sum(p.numel() for p in unet.parameters())
    b, s, text_len = 2, 32, 77
    x = torch.randn(b, unet.config.in_channels, s, s)
    ctx = torch.randn(b, text_len, unet.config.cross_attention_dim)
    t = torch.tensor([100.0 + 400.0 * i for i in range(b)])
    target = torch.randn_like(x)
    shape = f"unet {params} params, batch {b}, latents {unet.config.in_channels}x{s}x{s}, text {text_len}x{unet.config.cross_attention_dim}"

    def forward():
        with torch.no_grad():
            unet(x, t, ctx).sample.sum().item()

    def forward_backward():
        unet.zero_grad(set_to_none=True)
        loss = (unet(x, t, ctx).sample - target).pow(2).mean()
        loss.backward()

    reference = UNet2DConditionModel.from_config(config).float().requires_grad_(False)
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    lw, ll, noise = torch.randn(1, 4, s, s), torch.randn(1, 4, s, s), torch.randn(1, 4, s, s)
    ctx1 = torch.randn(1, text_len, unet.config.cross_attention_dim)
    tt = torch.tensor([500])

    def dpo_step():
        # Diffusion-DPO's train.py: shared noise and timestep, policy fwd+bwd and reference fwd on the pair.
        unet.zero_grad(set_to_none=True)
        x0 = torch.cat([lw, ll])
        n2 = noise.repeat(2, 1, 1, 1)
        t2 = tt.repeat(2)
        xt = sched.add_noise(x0, n2, t2)
        c2 = ctx1.repeat(2, 1, 1)
        pred = unet(xt, t2, c2).sample
        mse = (pred.float() - n2.float()).pow(2).mean(dim=[1, 2, 3])
        with torch.no_grad():
            rmse = (reference(xt, t2, c2).sample.float() - n2.float()).pow(2).mean(dim=[1, 2, 3])
        inside = -0.5 * 5000 * ((mse[0] - mse[1]) - (rmse[0] - rmse[1]))
        loss = -torch.nn.functional.logsigmoid(inside).mean()
        loss.backward()

    for name, f in [("unet_forward", forward), ("unet_forward_backward", forward_backward), ("dpo_step", dpo_step)]:
        secs = median_secs(repeats, f)
        print(json.dumps({"bench": name, "shape": shape, "median_s": secs, "threads": torch.get_num_threads(), "impl": f"pytorch {torch.__version__}", "device": DEVICE}))
    report_peak_memory()


if __name__ == "__main__":
    main()
