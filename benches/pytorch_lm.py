"""PyTorch side of the language-model benchmark: one policy step of the preference losses, i.e.
LlamaForCausalLM forward on a random batch, the summed completion log-probabilities of each row
(log_softmax(logits[t-1])[token t] over the completion tokens, which are the second half of every
row; no padding), and `.backward()` of their sum to every weight. Random weights, float32, CPU, one
warm-up, median of N. Not run by CI. BENCH_DEVICE=cuda runs it on the GPU (see bench_common.py).

    /path/to/venv/bin/python benches/pytorch_lm.py [CONFIG_JSON|-] [REPEATS] [THREADS] [--batch B] [--seq T]

CONFIG_JSON is a transformers Llama config.json (`-` or nothing: built-in defaults, hidden 512,
8 layers, 8 heads, 4 KV heads, intermediate 1376, vocab 32000); REPEATS defaults to 5, THREADS to
every core (`torch.set_num_threads`), batch to 4 and seq to 256. Prints one JSON line:
{"impl": "pytorch", "torch": ..., "config": {...}, "batch": B, "seq": T, "threads": n,
"median_ms": ..., "peak_rss_mb": ...}.
"""

import argparse
import json
import os
import resource

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench_common import DEVICE, median_secs, peak_gpu_gib, setup

DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="-", help="transformers Llama config.json, or - for the defaults")
    ap.add_argument("repeats", nargs="?", type=int, default=5)
    ap.add_argument("threads", nargs="?", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("REPEATS must be at least 1")

    torch.set_num_threads(args.threads)
    setup()
    torch.manual_seed(0)
    if args.config == "-":
        config = LlamaConfig(**DEFAULTS)
        source = "defaults"
    else:
        config = LlamaConfig.from_pretrained(args.config)
        source = args.config
    model = LlamaForCausalLM(config).float().train()
    params = sum(p.numel() for p in model.parameters())

    b, t = args.batch, args.seq
    ids = torch.randint(3, config.vocab_size, (b, t), dtype=torch.int64)
    attention_mask = torch.ones(b, t, dtype=torch.int64)
    completion_mask = torch.zeros(b, t)
    completion_mask[:, t // 2 :] = 1.0

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = torch.gather(logprobs, 2, ids[:, 1:, None])[..., 0]
        logp = (tok * completion_mask[:, 1:]).sum(-1)
        logp.sum().backward()

    secs = median_secs(args.repeats, step)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    summary = {
        "source": source,
        "params": params,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "attn_implementation": model.config._attn_implementation,
        "repeats": args.repeats,
    }
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "torch": torch.__version__,
                "config": summary,
                "batch": b,
                "seq": t,
                "threads": torch.get_num_threads(),
                "median_ms": secs * 1000.0,
                "peak_rss_mb": rss_mb,
                "device": DEVICE,
                "peak_gpu_gib": peak_gpu_gib(),
            }
        )
    )


if __name__ == "__main__":
    main()
