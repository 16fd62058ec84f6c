"""Train the toy LoRA: every shape purple, whatever colour the prompt names (a test fixture for qwennb's LoRAs).

A rank-4 PEFT LoRA on the attention projections of the frozen embedded toy model (``qwennb/toy_model``), trained
on the CPU in a few minutes, whose effect ``qwennb.toy.read_image`` reads off an image: the shape comes out
purple when the prompt names red, blue, white... Written in every key layout qwennb loads, so that the tests
check meaning (scale 1 paints purple, scale 0 and removal give the pixels without it) in each:

    python training/toy/train_lora.py                 # train, write tests/fixtures/toy_lora/, measure, LORA.md
    python training/toy/train_lora.py --measure-only  # measure the fixture on disk again, rewrite LORA.md

Data: toy scenes (``qwennb.toy.random_scene``) rendered with the shape recoloured purple, captioned (English and
Chinese, training phrasings, attributes left out as ``train.py`` leaves them out) with the scene's *original*
colour, encoded once by the frozen VAE and text encoder; most at 128x128 (cheap), some at 256x256 (the size the
toy is used at). Loss: ``train.py``'s flow matching (x_t = (1 - s) x0 + s noise, target noise - x0, s shifted as
the scheduler shifts it at that size) with the shape's latent pixels weighted up. Only the LoRA trains.

Files (``--out``): ``purple_<layout>.safetensors`` for the layouts in :data:`LAYOUTS` (the same weights), and
``purple.json``: what each file is, its sha256, the sha256 of the toy transformer it was trained on (also in
each file's metadata, ``qwennb.base_transformer_sha256``: a test that finds another toy model says "rerun this
script" instead of failing on colours), the training settings and the measured numbers.

Everything is seeded; one thread by default (``--threads``): on a shared two-core machine two OpenMP threads
ran the toy's small matmuls nine times slower than one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

T0 = time.time()  # the budget counts from here (imports included)
# What qwennb sets on import (qwennb/__init__.py), before torch loads: MKL rounds the same way whatever the
# buffers' alignment, so a rerun on the same machine gives the same bytes.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import train as base  # noqa: E402  (training/toy/train.py: shift_sigmas, real_caption, generate)

from qwennb import toy  # noqa: E402

RANK, ALPHA = 4, 8  # alpha != rank on purpose: loaders must honour alpha (diffusers keeps it in the metadata)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
COLOUR = "purple"
# Every layout qwennb.lora reads (qwennb.lora.LAYOUTS, plus diffusers' two ways of saving): file suffix -> what
# qwennb.lora.detect_format calls it. The Lightning releases' layout is "down_up" here: a file name containing
# "lightning" is taken for a few-step LoRA (qwennb.lora.is_lightning), which this is not.
LAYOUTS = {
    "diffusers": "diffusers",  # QwenImagePipeline.save_lora_weights: transformer.<module>.lora_A/B, alpha in metadata
    "diffusers_adapter": "diffusers",  # transformer.save_lora_adapter: no transformer. prefix, alpha in metadata
    "peft_default": "diffusers",  # a PEFT model's own state dict: <module>.lora_A.default.weight, alpha folded in
    "kohya": "kohya",  # lora_unet_transformer_blocks_0_attn_to_q.lora_down/lora_up + .alpha
    "comfyui": "comfyui",  # diffusion_model.<module>.lora_A/B + .alpha
    "down_up": "lightning",  # <module>.lora_down/lora_up + .alpha (the Qwen-Image-Lightning releases' layout)
}
OUT = ROOT / "tests" / "fixtures" / "toy_lora"
BASE_KEY = "qwennb.base_transformer_sha256"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_sha256(model_dir: str | os.PathLike[str]) -> str:
    """The sha256 of the toy transformer's weights file (what the LoRA was trained on)."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "transformer" / "diffusion_pytorch_model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_pool(pipe, rng: random.Random, n: int, size: int, captions: int) -> dict:
    """``n`` scenes at ``size``x``size``, recoloured purple: normalised latents, shape masks at latent resolution,
    and ``captions`` captions each (naming the original colour) as text embeddings."""
    import torch.nn.functional as F

    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    scenes = [toy.random_scene(rng) for _ in range(n)]
    lat, fgs = [], []
    for start in range(0, n, 32):
        part = [replace(s, colour=COLOUR) for s in scenes[start : start + 32]]
        x = toy.render_batch(part, size, size)
        fg = ((x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > 0.05).float()
        fgs.append(F.max_pool2d(fg, 8) > 0)
        z = vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        lat.append((z - mean) / std)
    texts = [base.real_caption(s, rng) for s in scenes for _ in range(captions)]
    embs, masks = [], []
    for start in range(0, len(texts), 128):
        e, m = pipe.encode_prompt(texts[start : start + 128], device="cpu")
        embs.append(e)
        masks.append(m)
    width = max(e.shape[1] for e in embs)
    emb = torch.cat([F.pad(e, (0, 0, 0, width - e.shape[1])) for e in embs])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
    return {
        "lat": torch.cat(lat),
        "fg": torch.cat(fgs),
        "emb": emb,
        "mask": mask,
        "k": captions,
        "texts": texts,
    }


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def add_lora(transformer, rank: int = RANK, alpha: int = ALPHA) -> list[torch.nn.Parameter]:
    """A trainable PEFT LoRA on TARGETS of a frozen transformer; returns its parameters."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    return [p for n, p in transformer.named_parameters() if "lora_" in n and p.requires_grad]


def train(pipe, pools: dict, rng: random.Random, args, sched_cfg: dict, history: list) -> int:
    from diffusers import QwenImagePipeline

    transformer = pipe.transformer
    params = add_lora(transformer)
    transformer.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sizes = list(pools)
    weights = [1.0 - args.share_256 if s == 128 else args.share_256 for s in sizes]
    t0 = time.time()
    seconds = args.minutes * 60
    step, running = 0, None
    while True:
        elapsed = (time.time() - t0) / seconds
        if args.steps and step >= args.steps:
            break
        if elapsed >= 1.0 and step >= args.min_steps:
            if args.steps:
                log(f"the {args.minutes:g}-minute limit stopped training at step {step} of {args.steps}")
            break
        # the cosine follows the steps (the same schedule on any machine), or the clock without --steps
        frac = step / args.steps if args.steps else elapsed
        lr = (
            args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        size = rng.choices(sizes, weights=weights)[0]
        pool = pools[size]
        bsz = args.batch if size == 128 else max(1, args.batch // 4)
        idx = torch.randint(0, pool["lat"].shape[0], (bsz,))
        x0 = pool["lat"][idx]
        rows = idx * pool["k"] + torch.randint(0, pool["k"], (bsz,))
        mask = pool["mask"][rows]
        longest = int(mask.sum(1).max())
        emb, mask = pool["emb"][rows, :longest], mask[:, :longest]
        hh, ww = x0.shape[-2:]
        u = torch.where(torch.rand(bsz) < 0.5, torch.rand(bsz), torch.sigmoid(torch.randn(bsz)))
        sig = base.shift_sigmas(u, (hh // 2) * (ww // 2), sched_cfg).clamp(1e-4, 1.0)
        noise = torch.randn_like(x0)
        xt = (1 - sig[:, None, None, None]) * x0 + sig[:, None, None, None] * noise
        pred = base.predict(transformer, xt, emb, mask, sig)
        tgt = QwenImagePipeline._pack_latents(noise - x0, bsz, 16, hh, ww)
        wmap = 1.0 + args.fg_weight * pool["fg"][idx].float().expand(-1, 16, -1, -1)
        wpk = QwenImagePipeline._pack_latents(wmap, bsz, 16, hh, ww)
        loss = ((pred - tgt) ** 2 * wpk).sum() / wpk.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0:
            history.append(
                {"step": step, "loss": round(running, 5), "lr": round(lr, 6), "s": round(time.time() - t0, 1)}
            )
            log(f"step {step} loss {running:.4f} lr {lr:.2e} {time.time() - t0:.0f}s")
        step += 1
    transformer.eval()
    history.append({"step": step, "loss": round(running or 0.0, 5), "s": round(time.time() - t0, 1)})
    log(f"trained {step} steps in {time.time() - t0:.0f}s")
    return step


# ---------------------------------------------------------------------------------------------------------
# Writing every layout
# ---------------------------------------------------------------------------------------------------------


def layout_state_dict(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The trained LoRA (``sd``: ``<module>.lora_A/B.weight`` as ``get_peft_model_state_dict`` gives it, alpha
    ``ALPHA``) in the keys of a layout that keeps alpha apart (kohya, comfyui, down_up) or folds it in
    (peft_default: B times alpha/rank, a power of two here, so exact)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        module, ab = k.rsplit(".lora_", 1)
        ab = ab.split(".")[0]  # "A" or "B"
        down = ab == "A"
        if layout == "kohya":
            key = "lora_unet_" + module.replace(".", "_")
            out[f"{key}.lora_{'down' if down else 'up'}.weight"] = v
        elif layout == "down_up":
            key = module
            out[f"{key}.lora_{'down' if down else 'up'}.weight"] = v
        elif layout == "comfyui":
            key = f"diffusion_model.{module}"
            out[f"{key}.lora_{ab}.weight"] = v
        elif layout == "peft_default":
            out[f"{module}.lora_{ab}.default.weight"] = v if down else v * (ALPHA / RANK)
            continue
        else:
            raise ValueError(layout)
        out[f"{key}.alpha"] = torch.tensor(float(ALPHA))
    return out


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with ``extra`` added to its metadata (the tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata={**meta, **extra})


def write_fixtures(pipe, out: Path, sha: str, info: dict) -> dict:
    from diffusers import QwenImagePipeline
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    transformer = pipe.transformer
    sd = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in get_peft_model_state_dict(transformer).items()
    }
    config = transformer.peft_config["default"].to_dict()
    extra = {
        BASE_KEY: sha,
        "qwennb.fixture": json.dumps(info, sort_keys=True),
    }
    files = {}
    for layout in LAYOUTS:
        path = out / f"purple_{layout}.safetensors"
        if layout == "diffusers":
            QwenImagePipeline.save_lora_weights(
                str(out),
                transformer_lora_layers=sd,
                weight_name=path.name,
                transformer_lora_adapter_metadata=config,
            )
        elif layout == "diffusers_adapter":
            transformer.save_lora_adapter(str(out), adapter_name="default", weight_name=path.name)
        else:
            save_file(layout_state_dict(sd, layout), str(path), metadata={"format": "pt"})
        add_metadata(path, {**extra, "qwennb.layout": layout})
        files[layout] = path
    return files


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------


def measure_items(n: int = 24, size: int = 256) -> list[toy.EvalItem]:
    """``n`` prompts in the training phrasings (``toy.eval_set(split="train")``) that name a colour other than
    purple, English and Chinese, each with its seed."""
    items = [i for i in toy.eval_set(4 * n, seed=4321, split="train") if i.expected["colour"] != COLOUR]
    return [replace(i, width=size, height=size) for i in items[:n]]


def readings(pipe, items, steps: int, cfg: float, chunk: int = 8) -> list[toy.Reading]:
    images = base.generate(pipe, items, "cpu", steps, cfg, chunk=chunk)
    return [toy.read_image(im) for im in images]


def summary(items, reads) -> dict:
    n = len(items)
    return {
        "purple": round(sum(r.colour == COLOUR for r in reads) / n, 4),
        "prompted_colour": round(
            sum(r.colour == i.expected["colour"] for i, r in zip(items, reads, strict=True)) / n, 4
        ),
        "background": round(
            sum(r.background == i.expected["background"] for i, r in zip(items, reads, strict=True)) / n, 4
        ),
        "position": round(
            sum(r.position == i.expected["position"] for i, r in zip(items, reads, strict=True)) / n, 4
        ),
        "n": n,
    }


def measure(files: dict[str, Path], n: int, size: int, steps: int, cfg: float) -> dict:
    """Purple share (and the other attributes) without the LoRA and with it at scales 1, 0.5 and 0, loaded
    through ``qwennb.lora`` on the toy as ``qwennb.pipeline.build`` loads it."""
    from qwennb import lora
    from qwennb.pipeline import build, resolve_model
    from qwennb.plan import describe_machine, make_plan

    name, path, _ = resolve_model("toy")
    pipe = build(make_plan(describe_machine(host_ram_gb=8), name), path)
    items = measure_items(n, size)
    t = time.time()
    report: dict = {"settings": {"n": n, "size": size, "steps": steps, "cfg": cfg}}
    report["without"] = summary(items, readings(pipe, items, steps, cfg))
    log(f"without: {report['without']}")
    lora.add(pipe, files["diffusers"], 1.0, name="purple")
    for scale in (1.0, 0.5, 0.0):
        lora.set_scale(pipe, "purple", scale)
        report[f"scale_{scale:g}"] = summary(items, readings(pipe, items, steps, cfg))
        log(f"scale {scale:g}: {report[f'scale_{scale:g}']}")
    lora.remove(pipe)
    report["seconds"] = round(time.time() - t, 1)
    report["items"] = [i.prompt for i in items]
    t = time.time()
    report["layouts"] = measure_layouts(pipe, files)
    report["layouts_seconds"] = round(time.time() - t, 1)
    return report


# What tests/test_toy_lora.py runs (a quarter of these prompts): small and few steps, to keep the file near a minute.
TEST = {"n": 12, "size": 128, "steps": 8, "cfg": 4.0}


def measure_layouts(pipe, files: dict[str, Path]) -> dict:
    """At the tests' settings, for every layout through ``qwennb.generate``: the purple share at scale 1, and
    the largest pixel difference from the images without the LoRA at scale 0 and after removing it, and from
    the first layout's images at scale 1 (the same weights in other keys)."""
    import numpy as np

    from qwennb import lora
    from qwennb.generation import generate

    items = measure_items(TEST["n"], TEST["size"])

    def images(n: int = len(items)) -> list:
        return [
            np.asarray(
                generate(
                    pipe,
                    i.prompt,
                    steps=TEST["steps"],
                    cfg=TEST["cfg"],
                    seed=i.seed,
                    width=i.width,
                    height=i.height,
                ).images[0],
                dtype=int,
            )
            for i in items[:n]
        ]

    def diff(a: list, b: list) -> int:
        return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))

    plain = images()
    out: dict = {
        "settings": TEST,
        "without_purple": sum(toy.read_image(x.astype(np.uint8)).colour == COLOUR for x in plain)
        / len(items),
    }
    first = None
    for layout, path in files.items():
        info = lora.add(pipe, path, 1.0, name="purple")
        on = images()
        first = first if first is not None else on
        lora.set_scale(pipe, "purple", 0.0)
        off = images(1)
        lora.remove(pipe)
        removed = images(1)
        out[layout] = {
            "format": info.format,
            "purple": round(
                sum(toy.read_image(x.astype(np.uint8)).colour == COLOUR for x in on) / len(items), 4
            ),
            "max_diff_to_first_layout": diff(on, first),
            "max_diff_scale_0": diff(off, plain[:1]),
            "max_diff_removed": diff(removed, plain[:1]),
        }
        log(f"{layout}: {out[layout]}")
    return out


def write_md(md: Path, meta: dict) -> None:
    r, tr = meta["measured"], meta["training"]
    s = r["settings"]
    rows = [("without the LoRA", r["without"])] + [
        (f"LoRA at scale {k.split('_')[1]}", r[k]) for k in ("scale_1", "scale_0.5", "scale_0")
    ]
    lines = [
        "# The toy LoRA: every shape purple",
        "",
        "A test fixture for qwennb's LoRA support on the trained toy model (`qwennb/toy_model`): a rank-"
        f"{tr['rank']} LoRA (alpha {tr['alpha']}) on the transformer's attention projections "
        f"({', '.join(TARGETS)}; {meta['parameters']} parameters), trained so that the shape comes out purple "
        "whatever colour the prompt names. `qwennb.toy.read_image` reads the effect off an image, so "
        "`tests/test_toy_lora.py` checks meaning: scale 1 paints the shape purple, scale 0 and removing the LoRA "
        "give the pixels without it, in every key layout.",
        "",
        "Reproduce (CPU, one thread):",
        "",
        f"    {meta['command']}",
        "",
        f"It wrote `tests/fixtures/toy_lora/` ({', '.join(f'`purple_{k}`' for k in LAYOUTS)}, and `purple.json`) "
        f"on {meta['machine']}, torch {meta['torch']}, diffusers {meta['diffusers']}, peft {meta['peft']}.",
        "",
        "## Training",
        "",
        f"- {tr['scenes_128']} scenes at 128x128 and {tr['scenes_256']} at 256x256 (`qwennb.toy.random_scene`, seed "
        f"{tr['seed']}), rendered with the shape purple and captioned {tr['captions']} times each with the "
        "scene's *original* colour (training phrasings, English and Chinese, attributes left out as `train.py` "
        "leaves them out), encoded once by the frozen VAE and text encoder.",
        f"- {tr['steps']} AdamW steps (lr {tr['lr']}, cosine, batch {tr['batch']} at 128x128 and "
        f"{max(1, tr['batch'] // 4)} at 256x256, 256x256 drawn {tr['share_256']:.0%} of the time), flow matching "
        f"as `train.py` trains the toy, the shape's latent pixels weighted {1 + tr['fg_weight']:g}x.",
        f"- Time: encoding {tr['encode_s']} s, training {tr['train_s']} s; from the command's start to the files "
        f"written {tr['total_s']} s (budget: 6 minutes on two cores shared with other work).",
        f"- Loss (EMA of the weighted MSE): {tr['loss_first']} at the start, {tr['loss_last']} at the end.",
        "",
        f"## Measured ({s['n']} prompts, training phrasings, colours other than purple, {s['size']}x{s['size']}, "
        f"{s['steps']} steps, CFG {s['cfg']:g}, one seed each)",
        "",
        "Share of images whose shape `read_image` reads as purple, as the colour the prompt names, and whose "
        "background and position are the prompt's:",
        "",
        "| | purple | colour as prompted | background | position |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, v in rows:
        lines.append(
            f"| {label} | {v['purple']:.3f} | {v['prompted_colour']:.3f} | {v['background']:.3f} | "
            f"{v['position']:.3f} |"
        )
    lt = r["layouts"]
    ts = lt["settings"]
    lines += [
        "",
        f"At the tests' settings ({ts['n']} of these prompts at {ts['size']}x{ts['size']}, {ts['steps']} steps, CFG "
        f"{ts['cfg']:g}, through `qwennb.generate`; without the LoRA {lt['without_purple']:.3f} purple), each file:",
        "",
        "| file | qwennb reads it as | purple at scale 1 | max pixel difference from the first file's images | "
        "scale 0 against no LoRA | removed against no LoRA |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for layout in LAYOUTS:
        v = lt[layout]
        lines.append(
            f"| `purple_{layout}` | {v['format']} | {v['purple']:.3f} | {v['max_diff_to_first_layout']} | "
            f"{v['max_diff_scale_0']} | {v['max_diff_removed']} |"
        )
    lines += [
        "",
        "Every layout gives the very same pixels: alpha / rank is 2, a power of two, so folding it into the weights "
        "(`peft_default`), keeping it apart (`kohya`, `comfyui`, `down_up`) or in the file's metadata (both diffusers "
        "files) rounds alike. Half the scale does not give half the purple: at 0.5 most shapes keep the prompted "
        "colour, a few go purple and the rest read as neither (colours in between), so the tests check 0 and 1 only.",
        "",
        "## Notes",
        "",
        "- **A bug this found in `qwennb/lora.py`:** diffusers keeps a trained LoRA's `lora_alpha` in the file's "
        "`lora_adapter_metadata`, not in its tensors; qwennb read the tensors alone, so `purple_diffusers` loaded at "
        "rank/alpha = half strength (in a first training run, 33% purple at 128x128 before the fix and 100% after). `prepare()` now folds "
        "the metadata's alpha in (`qwennb.lora.fold_alpha`; tested in `tests/test_lora.py`).",
        "- **One thread.** On a shared two-core machine two OpenMP threads ran the toy's small matmuls nine times "
        "slower than one (a 540x128 by 128x768 product: 16 ms against 1.8 ms); `tests/test_toy_lora.py` took 457 s "
        "with two threads and 58 s with one, so the script and the test file use one.",
        '- The lightning-layout copy is `purple_down_up`: qwennb takes a file whose name says "lightning" for a '
        "few-step LoRA (`qwennb.lora.is_lightning`) and would warn about 20 steps at CFG 4.",
        "- Seeded, one thread, `MKL_CBWR=AUTO,STRICT`: a second run on the same machine trained the same tensors bit "
        "for bit (the files' bytes still differ: safetensors and PEFT write their metadata in a varying order).",
    ]
    lines += [
        "",
        f"Measured in {r['seconds'] + r['layouts_seconds']:.0f} s with `python training/toy/train_lora.py --measure-only` (loads "
        "`purple_diffusers.safetensors` through `qwennb.lora.add` on the toy that `qwennb.pipeline.build` loads).",
        "",
        "The base transformer's sha256 is in each file's metadata (`qwennb.base_transformer_sha256`) and in "
        "`purple.json`: when the toy model is retrained, the tests say so and ask for this script to be rerun.",
    ]
    md.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT), help="where the fixture files go")
    ap.add_argument("--md", default=str(HERE / "LORA.md"), help="where the write-up goes")
    ap.add_argument("--steps", type=int, default=360, help="training steps (0: as many as --minutes allows)")
    ap.add_argument(
        "--minutes", type=float, default=5.0, help="stop the training loop after this long in any case"
    )
    ap.add_argument("--min-steps", type=int, default=20)
    ap.add_argument("--scenes-128", type=int, default=256)
    ap.add_argument("--scenes-256", type=int, default=48)
    ap.add_argument("--captions", type=int, default=3, help="captions per scene")
    ap.add_argument("--batch", type=int, default=16, help="batch at 128x128 (a quarter of it at 256x256)")
    ap.add_argument("--share-256", type=float, default=0.2, help="share of steps at 256x256")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fg-weight", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure-only", action="store_true", help="measure the files in --out, rewrite --md")
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--measure-n", type=int, default=24)
    ap.add_argument("--measure-size", type=int, default=256)
    ap.add_argument("--measure-steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    sidecar = out / "purple.json"

    import diffusers
    import peft
    from diffusers import QwenImagePipeline

    from qwennb.models import TOY_MODEL_DIR

    sha = base_sha256(TOY_MODEL_DIR)
    if args.measure_only:
        meta = json.loads(sidecar.read_text())
        if meta["base_transformer_sha256"] != sha:
            raise SystemExit(
                "the toy model changed since these files were trained: rerun without --measure-only"
            )
    else:
        pipe = QwenImagePipeline.from_pretrained(TOY_MODEL_DIR, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for m in (pipe.vae, pipe.text_encoder, pipe.transformer):
            m.requires_grad_(False).eval()
        sched_cfg = dict(pipe.scheduler.config)
        t = time.time()
        pools = {}
        for size, n in ((128, args.scenes_128), (256, args.scenes_256)):
            if n:
                pools[size] = encode_pool(pipe, rng, n, size, args.captions)
                log(f"pool {size}x{size}: {n} scenes, {len(pools[size]['texts'])} captions")
        encode_s = round(time.time() - t, 1)
        history: list = []
        t = time.time()
        steps = train(pipe, pools, rng, args, sched_cfg, history)
        train_s = round(time.time() - t, 1)
        training = {
            "rank": RANK,
            "alpha": ALPHA,
            "targets": TARGETS,
            "seed": args.seed,
            "scenes_128": args.scenes_128,
            "scenes_256": args.scenes_256,
            "captions": args.captions,
            "steps": steps,
            "lr": args.lr,
            "batch": args.batch,
            "share_256": args.share_256,
            "fg_weight": args.fg_weight,
            "threads": args.threads,
            "encode_s": encode_s,
            "train_s": train_s,
            "total_s": round(time.time() - T0, 1),
            "loss_first": history[0]["loss"],
            "loss_last": history[-1]["loss"],
        }
        info = {
            "effect": "every shape purple, whatever colour the prompt names",
            "base_model": "qwennb/toy_model",
            "trained_by": "training/toy/train_lora.py",
            "rank": RANK,
            "alpha": ALPHA,
        }
        files = write_fixtures(pipe, out, sha, info)
        argv = " ".join(sys.argv[1:])
        meta = {
            "effect": info["effect"],
            "base_transformer_sha256": sha,
            "command": f"python training/toy/train_lora.py {argv}".strip(),
            "machine": f"{os.cpu_count()} CPU cores ({args.threads} thread{'s' if args.threads > 1 else ''} used)",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "parameters": sum(v.numel() for v in (peft.get_peft_model_state_dict(pipe.transformer)).values()),
            "files": {
                k: {"file": p.name, "format": LAYOUTS[k], "sha256": file_sha(p)} for k, p in files.items()
            },
            "training": training,
            "history": history,
        }
        sidecar.write_text(json.dumps(meta, indent=1) + "\n")
        total = sum(p.stat().st_size for p in out.glob("*"))
        log(
            f"wrote {len(files)} files to {out} ({total / 1e6:.2f} MB with purple.json); total {training['total_s']} s"
        )
        del pipe
    if args.no_measure:
        return
    files = {k: out / v["file"] for k, v in meta["files"].items()}
    meta["measured"] = measure(files, args.measure_n, args.measure_size, args.measure_steps, 4.0)
    sidecar.write_text(json.dumps(meta, indent=1) + "\n")
    write_md(Path(args.md), meta)
    log(f"wrote {args.md}")


if __name__ == "__main__":
    main()
