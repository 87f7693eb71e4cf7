"""PyTorch side of `diffalign bench --suite reno`: one ReNO iteration on the shared bench configs
(unet-mid + vae-mid + clip-mid, random weights): one-step Euler generation at t=999 from 4x32x32
noise, VAE decode to 256x256, bicubic antialiased resize to 224, CLIP score 100*cos against a fixed
text embedding, loss 0.05*(30-score) + 0.01*regulariser, backward to the noise, gradient clipped to
0.1, SGD step (lr 5, Nesterov momentum 0.9). One warm-up, median of N. Not run by CI.

    /path/to/venv/bin/python benches/pytorch_reno.py ../shared/bench [REPEATS]
"""

import json
import math
import os
import resource
import statistics
import sys
import time

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPVisionModelWithProjection

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def main():
    bench = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(2)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(bench, "unet-mid"))).float()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(bench, "vae-mid"))).float()
    clip_cfg = CLIPConfig.from_pretrained(os.path.join(bench, "clip-mid"))
    clip = CLIPVisionModelWithProjection(clip_cfg.vision_config).float()
    for m in (unet, vae, clip):
        m.requires_grad_(False)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    sched.set_timesteps(1)
    sigma = sched.sigmas[0].item()
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim)
    text = torch.nn.functional.normalize(torch.randn(1, clip_cfg.vision_config.projection_dim), dim=-1)
    z = torch.randn(1, 4, 32, 32, requires_grad=True)
    opt = torch.optim.SGD([z], lr=5, momentum=0.9, nesterov=True)
    d = z.numel()
    size = clip_cfg.vision_config.image_size

    def iteration():
        opt.zero_grad()
        latents = z * sched.init_noise_sigma
        inp = latents / math.sqrt(sigma**2 + 1)
        eps = unet(inp, torch.tensor([999.0]), ctx).sample
        x0 = latents - sigma * eps
        image = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        pix = torch.nn.functional.interpolate(image, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        emb = torch.nn.functional.normalize(clip(pixel_values=(pix - MEAN) / STD).image_embeds, dim=-1)
        score = 100 * (emb * text).sum()
        norm = torch.linalg.vector_norm(z)
        loss = 0.05 * (30 - score) + 0.01 * (0.5 * norm**2 - (d - 1) * torch.log(norm))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([z], 0.1)
        opt.step()

    iteration()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t)
    shape = f"unet-mid + vae-mid + clip-mid: noise 4x32x32, image 256x256, CLIP {size}x{size}"
    print(json.dumps({"bench": "reno_iteration", "shape": shape, "median_s": statistics.median(times), "threads": torch.get_num_threads(), "impl": f"pytorch {torch.__version__}"}))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"bench": "peak_rss", "bytes": rss, "gib": rss / (1 << 30), "impl": "pytorch"}))


if __name__ == "__main__":
    main()
