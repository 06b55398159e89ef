#!/usr/bin/env python3
"""PyTorch/diffusers equivalents of `diffpref bench` rows, timed side by side with diffpref.

Requirements (pinned where measured): torch 2.15.0, diffusers 0.42.1 (no peft: the LoRA below is the same math,
`W x + (B A x) * alpha / r`, on to_q, to_k, to_v, to_out.0, A Kaiming-uniform, B zero, as PEFT initialises it).

Rows (each one the same work as the `diffpref bench` row named):

  dpo       `diffpref bench dpo [--sd15] --latent L --batch B`: one Diffusion-DPO LoRA step. The UNet on
            [winners; losers] (2B latents) with graph, the reference forward (adapters off) without, the sigmoid
            DPO loss in f32 (beta 5000), backward, AdamW (lr 1e-5) on the f32 adapters. Random latents, noise,
            timesteps and 77-token text states; no VAE, no text encoder.
  pipeline  `diffpref bench foundation`'s "pipeline s/step": text-to-image with CFG 7.5, 10 steps of the model's
            scheduler, VAE decode, divided by the steps.

With --diffpref BIN the same row is run by diffpref in the same invocation (same machine, same load) and the ratio
diffpref/PyTorch steps-per-second is printed: > 1 means diffpref is faster.

  python scripts/torch_reference.py dpo --model tests/fixtures/tiny-sd --diffpref target/release/diffpref
  python scripts/torch_reference.py dpo --sd15 --latent 32 --iters 2 --diffpref target/release/diffpref
  python scripts/torch_reference.py pipeline --model tests/fixtures/tiny-sd --diffpref target/release/diffpref
  python scripts/torch_reference.py dpo --sd15 --latent 64 --batch 8 --device cuda --dtype bf16
"""

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# The SD1.5 UNet (`diffpref bench --sd15` builds the same one with random weights).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraLinear(torch.nn.Module):
    """`base(x) + B(A(x)) * scale`, adapters switchable (the DPO reference is the UNet with them off)."""

    def __init__(self, base, rank):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = 1.0
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        h = F.linear(F.linear(x.float(), self.a), self.b) * self.scale
        return y + h.to(y.dtype)


def add_lora(unet, rank):
    """LoRA on to_q, to_k, to_v and to_out.0 of every attention (attn1, attn2)."""
    wrapped = []
    for name, attn in list(unet.named_modules()):
        if not name.endswith(("attn1", "attn2")):
            continue
        for child in ("to_q", "to_k", "to_v"):
            lora = LoraLinear(getattr(attn, child), rank)
            setattr(attn, child, lora)
            wrapped.append(lora)
        lora = LoraLinear(attn.to_out[0], rank)
        attn.to_out[0] = lora
        wrapped.append(lora)
    return wrapped


def peak_mem(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dpo_row(a, device, dtype):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if a.sd15:
        unet = UNet2DConditionModel(**SD15_UNET)
        name = "sd15-random"
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    else:
        unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
        name = a.model.rstrip("/").split("/")[-1]
        sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    unet = unet.to(device=device, dtype=dtype).requires_grad_(False)
    loras = add_lora(unet, a.rank)
    params = [p for l in loras for p in (l.a, l.b)]
    opt = torch.optim.AdamW(params, lr=1e-5)
    b, hw = a.batch, a.latent or unet.config.sample_size
    c = unet.config.in_channels
    ctx = unet.config.cross_attention_dim
    ctx = ctx if isinstance(ctx, int) else ctx[0]
    lw = torch.randn(b, c, hw, hw, device=device)
    ll = torch.randn(b, c, hw, hw, device=device)
    noise = torch.randn(b, c, hw, hw, device=device)
    t = torch.tensor([(137 * i + 500) % sched.config.num_train_timesteps for i in range(b)], device=device)
    ehs = torch.randn(2 * b, 77, ctx, device=device, dtype=dtype)
    x0 = torch.cat([lw, ll])
    n2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
    noisy = sched.add_noise(x0, n2, t2.cpu()).to(dtype)

    def step():
        pred = unet(noisy, t2, ehs).sample.float()
        with torch.no_grad():
            for l in loras:
                l.enabled = False
            ref = unet(noisy, t2, ehs).sample.float()
            for l in loras:
                l.enabled = True
        err = ((pred - n2) ** 2).mean(dim=(1, 2, 3))
        rerr = ((ref - n2) ** 2).mean(dim=(1, 2, 3))
        mw, ml = err.chunk(2)
        rw, rl = rerr.chunk(2)
        inside = -0.5 * 5000.0 * ((mw - ml) - (rw - rl))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    s = (time.perf_counter() - t0) / a.iters
    return name, f"dpo lora r{a.rank} b{b} {hw}x{hw}", s, peak_mem(device)


def pipeline_row(a, device, dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    steps = 10

    def run():
        with torch.no_grad():
            pipe(["a red circle"] * a.batch, num_inference_steps=steps, guidance_scale=7.5, output_type="np")
        sync(device)

    run()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        run()
    s = (time.perf_counter() - t0) / a.iters / steps
    name = a.model.rstrip("/").split("/")[-1]
    return name, f"pipeline s/step (b{a.batch}, cfg)", s, peak_mem(device)


def diffpref_row(a):
    """Runs the same row with diffpref's bench, returns its seconds (per step)."""
    if a.row == "dpo":
        cmd = [a.diffpref, "bench", "dpo", "--batch", str(a.batch), "--iters", str(a.iters), "--rank", str(a.rank)]
        cmd += ["--sd15"] if a.sd15 else ["--model", a.model]
    else:
        cmd = [a.diffpref, "bench", "foundation", "--model", a.model, "--batch", str(a.batch),
               "--iters", str(a.iters)]
    if a.latent:
        cmd += ["--latent", str(a.latent)]
    cmd += ["--device", a.device, "--dtype", a.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    key = "dpo lora" if a.row == "dpo" else "pipeline s/step"
    for line in out.splitlines():
        if key in line:
            m = re.search(r"([0-9.]+)\s*$", line)
            return float(m.group(1)), line.strip()
    sys.exit(f"no `{key}` row in diffpref's output:\n{out}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("row", choices=["dpo", "pipeline"])
    p.add_argument("--model", default="tests/fixtures/tiny-sd")
    p.add_argument("--sd15", action="store_true")
    p.add_argument("--latent", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--diffpref", help="diffpref binary: run the same row and print the ratio")
    p.add_argument("--json", help="write the row(s) here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    name, what, s, mem = (dpo_row if a.row == "dpo" else pipeline_row)(a, device, dtype)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), {a.device}, {a.dtype}")
    print(f"pytorch   {name:<14} {what:<40} {s:9.4f} s/step  {1 / s:8.3f} steps/s  peak {mem / 2**30:.2f} GiB")
    row = {"name": name, "what": what, "pytorch_s": s, "pytorch_peak_bytes": mem}
    if a.diffpref:
        ds, line = diffpref_row(a)
        print(f"diffpref  {line}")
        print(f"ratio (diffpref steps/s over PyTorch's): {s / ds:.2f}x")
        row.update(diffpref_s=ds, ratio=s / ds, diffpref_line=line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
