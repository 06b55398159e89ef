"""Checks diffpref's single-file checkpoints against diffusers' own reader.

For each tiny test model, `diffpref convert --model tests/fixtures/<m> --out <m>.safetensors` writes the
single-file (original LDM layout) version; this script loads it with diffusers' `from_single_file(config=folder)`
and compares every UNet / VAE / text-encoder tensor, and the UNet, VAE-decoder and text-encoder outputs, with the
diffusers folder. Usage (torch, diffusers, transformers installed):

    python scripts/check_single_file.py DIR_WITH_SINGLE_FILES tests/fixtures [GOLDEN.json]

Prints one line per model and exits 1 on any difference. With GOLDEN.json (when every model passed) it writes
the verified files' contents as {model: {key: [shape, dtype, sha256 of the little-endian bytes]}}: the golden
`tests/single_file.rs` checks diffpref's converter against (tests/fixtures/golden/single_file.json).
"""
import hashlib
import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

sf_dir, fixtures = Path(sys.argv[1]), Path(sys.argv[2])
failed = False
for name, cls in [("tiny-sd", StableDiffusionPipeline), ("tiny-sd2", StableDiffusionPipeline),
                  ("tiny-sdxl", StableDiffusionXLPipeline)]:
    folder = fixtures / name
    ref = cls.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32) if cls is StableDiffusionPipeline else cls.from_pretrained(folder, torch_dtype=torch.float32)
    kw = {"safety_checker": None} if cls is StableDiffusionPipeline else {}
    got = cls.from_single_file(str(sf_dir / f"{name}.safetensors"), config=str(folder), local_files_only=True, torch_dtype=torch.float32, **kw)
    if cls is StableDiffusionXLPipeline:
        # diffusers tells SDXL's two text encoders apart by width (768 vs 1280); the tiny model's are both 32
        # wide, so from_single_file reads embedders.0 for both. Read encoder 2 with diffusers' own OpenCLIP
        # converter at its SDXL prefix instead.
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        from safetensors.torch import load_file
        from transformers import CLIPTextModelWithProjection
        ckpt = load_file(str(sf_dir / f"{name}.safetensors"))
        te2 = CLIPTextModelWithProjection(ref.text_encoder_2.config)
        sd = convert_open_clip_checkpoint(te2, ckpt, prefix="conditioner.embedders.1.model.")
        missing, unexpected = te2.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            print(f"{name}/text_encoder_2: missing {missing[:3]}, unexpected {unexpected[:3]}")
            failed = True
        got.text_encoder_2 = te2
    worst = 0.0
    n = 0
    comps = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if cls is StableDiffusionXLPipeline else [])
    for comp in comps:
        a, b = getattr(ref, comp).state_dict(), getattr(got, comp).state_dict()
        keys = [k for k in a if not k.endswith("position_ids")]
        missing = [k for k in keys if k not in b]
        if missing:
            print(f"{name}/{comp}: missing {missing[:3]}")
            failed = True
            continue
        meta = [k for k in keys if b[k].is_meta]
        if meta:
            print(f"{name}/{comp}: not loaded from the single file: {meta[:5]}")
            failed = True
            continue
        for k in keys:
            d = (a[k].float() - b[k].float().reshape(a[k].shape)).abs().max().item()
            worst = max(worst, d)
            n += 1
    torch.manual_seed(0)
    with torch.no_grad():
        u = ref.unet.config
        x = torch.randn(1, u.in_channels, u.sample_size, u.sample_size)
        ids = ref.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        outs = []
        for p in (ref, got):
            h = p.text_encoder(ids, output_hidden_states=True)
            ctx = h.last_hidden_state
            added = None
            if cls is StableDiffusionXLPipeline:
                h2 = p.text_encoder_2(ids, output_hidden_states=True)
                ctx = torch.cat([h.hidden_states[-2], h2.hidden_states[-2]], -1)
                added = {"text_embeds": h2.text_embeds, "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]])}
            e = p.unet(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            img = p.vae.decode(x / p.vae.config.scaling_factor).sample
            outs.append((ctx, e, img))
        out_diff = max((a - b).abs().max().item() for a, b in zip(*outs))
    # Weights must be bit-identical; outputs may differ by float reassociation between attention kernels.
    ok = worst == 0.0 and out_diff < 1e-4
    failed |= not ok
    print(f"{name}: {n} tensors, max |diff| {worst:.3g}; text/unet/vae outputs max |diff| {out_diff:.3g}: {'ok' if ok else 'DIFFERENT'}")
if len(sys.argv) > 3 and not failed:
    from safetensors.numpy import load_file as load_np
    golden = {}
    for name in ["tiny-sd", "tiny-sd2", "tiny-sdxl"]:
        arrays = load_np(str(sf_dir / f"{name}.safetensors"))
        golden[name] = {k: [list(v.shape), str(v.dtype), hashlib.sha256(v.astype(v.dtype.newbyteorder("<")).tobytes()).hexdigest()]
                        for k, v in sorted(arrays.items())}
    Path(sys.argv[3]).write_text("{\n" + ",\n".join(f"{json.dumps(m)}: {json.dumps(golden[m], sort_keys=True, separators=(',', ':'))}" for m in sorted(golden)) + "\n}\n")
    print(f"wrote {sys.argv[3]}")
sys.exit(1 if failed else 0)
