"""Train the toy few-step LoRA: 4 steps at CFG 1 that land where 20 steps at CFG 4 land (as Lightning does).

A test fixture for qwennb's few-step path on the trained toy model (`qwennb/toy_model`), distilled the way the
Lightning LoRAs are meant (the teacher's many guided steps into a few unguided ones), on the CPU:

    python training/toy/train_fewstep_lora.py

1. Teacher trajectories: the toy model itself, Euler at CFG 4 with true CFG's rescale as the pipeline does it, on
   the 20-step schedule with the 4-step schedule's sigmas added (the two grids do not nest: both are stretched to
   the scheduler's terminal sigma), training-phrasing captions at 128x128 and 256x256; its latents kept at the
   4-step schedule's sigmas and at the end.
2. A rank-8 LoRA on the attention projections, trained so that one unguided Euler step from the teacher's latents
   at each of those levels reaches the teacher's latents at the next: the target velocity is the teacher's
   secant, (x[next] - x[here]) / (sigma[next] - sigma[here]).
3. The result is written as a diffusers LoRA (`tests/fixtures/toy_lora/fewstep4.safetensors`, the base
   transformer's sha256 in its metadata) and measured on held-out prompts: adherence at 4 steps, CFG 1 with and
   without it against 20 steps, CFG 4, and the mean pixel distance from the 20-step picture of the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from train_lora import BASE_KEY, TARGETS, add_lora, add_metadata, base_sha256  # noqa: E402

from qwennb import toy  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "toy_lora" / "fewstep4.safetensors"
TEACHER_STEPS, TEACHER_CFG, STUDENT_STEPS = 20, 4.0, 4
RANK, ALPHA = 8, 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def schedule(pipe, size: int, steps: int) -> torch.Tensor:
    """The sigmas (steps + 1, the last 0) that QwenImagePipeline uses for ``steps`` steps at ``size``: its
    linspace, shifted for the image's token count and stretched to the scheduler's terminal value."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    sch = pipe.scheduler
    mu = calculate_shift(
        (size // 16) ** 2,
        sch.config.get("base_image_seq_len", 256),
        sch.config.get("max_image_seq_len", 4096),
        sch.config.get("base_shift", 0.5),
        sch.config.get("max_shift", 1.15),
    )
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sch.sigmas.clone().float()


def velocity(transformer, x: torch.Tensor, emb, mask, sigma: torch.Tensor, side: int) -> torch.Tensor:
    """The transformer's velocity for packed latents ``x`` (N, side * side, 64) at noise levels ``sigma`` (N)."""
    return transformer(
        hidden_states=x,
        encoder_hidden_states=emb,
        encoder_hidden_states_mask=mask,
        timestep=sigma,
        img_shapes=[[(1, side, side)]] * x.shape[0],
        return_dict=False,
    )[0]


def guided_velocity(transformer, x, s, cond, uncond, side: int) -> torch.Tensor:
    """True CFG as QwenImagePipeline computes it: the guided velocity rescaled to the conditional one's norm."""
    t = s.expand(x.shape[0])
    v_c, v_u = (velocity(transformer, x, emb, mask, t, side) for emb, mask in (cond, uncond))
    comb = v_u + TEACHER_CFG * (v_c - v_u)
    return comb * (v_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


@torch.no_grad()
def trajectories(pipe, rng: random.Random, n: int, size: int, seed0: int) -> list[dict]:
    """``n`` teacher runs at ``size`` (Euler, CFG 4, on the 20-step schedule with the 4-step schedule's sigmas
    added, so that each run passes through them): packed latents there, the sigmas, the text embedding."""
    student = schedule(pipe, size, STUDENT_STEPS)
    grid = torch.unique(torch.cat([schedule(pipe, size, TEACHER_STEPS), student])).flip(0)  # 1 ... 0
    keep = [int((grid - v).abs().argmin()) for v in student]
    tokens, side = (size // 16) ** 2, size // 16
    uncond = pipe.encode_prompt(" ")
    transformer = pipe.transformer
    out = []
    for k in range(n):
        scene = toy.random_scene(rng)
        lang = "zh" if rng.random() < 0.5 else "en"
        prompt = toy.caption(scene, rng, lang=lang, drop={"size": 0.4, "position": 0.2, "background": 0.2})
        g = torch.Generator("cpu").manual_seed(seed0 + k)
        x = torch.randn(1, tokens, 64, generator=g)
        cond = pipe.encode_prompt(prompt)
        states = {0: x.clone()}
        for i in range(len(grid) - 1):
            v = guided_velocity(transformer, x, grid[i : i + 1], cond, uncond, side)
            x = x + (grid[i + 1] - grid[i]) * v
            states[i + 1] = x.clone()
        emb, mask = cond
        out.append(
            {
                "x": torch.cat([states[i] for i in keep]),  # (5, tokens, 64)
                "sig": student,
                "emb": emb[0],
                "mask": mask[0] if mask is not None else torch.ones(emb.shape[1], dtype=torch.long),
                "size": size,
            }
        )
    return out


def train(
    pipe, data: list[dict], steps: int, batch: int, lr: float, rng: random.Random, history: list
) -> None:
    transformer = pipe.transformer
    params = add_lora(transformer, RANK, ALPHA)
    transformer.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    by_size: dict[int, list[dict]] = {}
    for d in data:
        by_size.setdefault(d["size"], []).append(d)
    sizes = sorted(by_size)
    t0, running = time.time(), None
    for step in range(steps):
        cur = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for grp in opt.param_groups:
            grp["lr"] = cur
        size = rng.choices(sizes, weights=[len(by_size[s]) for s in sizes])[0]
        picks = [rng.choice(by_size[size]) for _ in range(batch if size <= 128 else max(1, batch // 4))]
        which = [rng.randrange(STUDENT_STEPS) for _ in picks]
        x = torch.stack([d["x"][i] for d, i in zip(picks, which, strict=True)])
        x_next = torch.stack([d["x"][i + 1] for d, i in zip(picks, which, strict=True)])
        s = torch.stack([d["sig"][i] for d, i in zip(picks, which, strict=True)])
        s_next = torch.stack([d["sig"][i + 1] for d, i in zip(picks, which, strict=True)])
        target = (x_next - x) / (s_next - s)[:, None, None]
        width = max(d["emb"].shape[0] for d in picks)
        emb = torch.stack(
            [torch.nn.functional.pad(d["emb"], (0, 0, 0, width - d["emb"].shape[0])) for d in picks]
        )
        mask = torch.stack(
            [torch.nn.functional.pad(d["mask"], (0, width - d["mask"].shape[0])) for d in picks]
        )
        side = size // 16
        pred = velocity(transformer, x, emb, mask, s, side)
        loss = ((pred - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(running, 5), "s": round(time.time() - t0, 1)})
            log(f"step {step} loss {running:.4f} lr {cur:.2e} {time.time() - t0:.0f}s")
    transformer.eval()


@torch.no_grad()
def measure(n: int, size: int) -> dict:
    """Held-out adherence and pixel distance: 20 steps CFG 4; 4 steps CFG 1 without and with the LoRA."""
    import numpy as np

    from qwennb.session import Session

    items = toy.eval_set(n, split="heldout", seed=5)
    s = Session()
    s.load("toy")

    def run(steps, cfg, lora=None):
        kw = {"loras": [{"source": str(OUT), "scale": 1.0}]} if lora else {}
        return [
            s.generate(i.prompt, seed=i.seed, steps=steps, cfg=cfg, width=size, height=size, **kw).images[0]
            for i in items
        ]

    ref = run(TEACHER_STEPS, TEACHER_CFG)
    out = {"teacher_20_cfg4": toy.score(items, ref)["all"]}
    for name, lora in (("4_cfg1_without", False), ("4_cfg1_with_lora", True)):
        imgs = run(STUDENT_STEPS, 1.0, lora)
        dist = [
            float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())
            for a, b in zip(imgs, ref, strict=True)
        ]
        out[name] = {**toy.score(items, imgs)["all"], "mean_abs_px_vs_20": round(float(np.mean(dist)), 2)}
    s.unload()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-128", type=int, default=160, help="teacher runs at 128x128")
    ap.add_argument("--n-256", type=int, default=32, help="teacher runs at 256x256")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-n", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    from diffusers import QwenImagePipeline

    from qwennb.models import TOY_MODEL_DIR

    t0 = time.time()
    pipe = QwenImagePipeline.from_pretrained(TOY_MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    data = trajectories(pipe, rng, args.n_128, 128, 10_000) + trajectories(pipe, rng, args.n_256, 256, 20_000)
    t_data = time.time() - t0
    log(f"{len(data)} teacher trajectories in {t_data:.0f}s")
    history: list = []
    train(pipe, data, args.steps, args.batch, args.lr, rng, history)
    t_train = time.time() - t0 - t_data
    from peft import get_peft_model_state_dict

    sd = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(pipe.transformer).items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    QwenImagePipeline.save_lora_weights(
        str(OUT.parent),
        transformer_lora_layers=sd,
        weight_name=OUT.name,
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict(),
    )
    add_metadata(
        OUT, {BASE_KEY: base_sha256(TOY_MODEL_DIR), "qwennb.fixture": "toy few-step LoRA (4 steps, CFG 1)"}
    )
    log(f"wrote {OUT} after {t_train:.0f}s of training")
    report = {
        "teacher": {
            "steps": TEACHER_STEPS,
            "cfg": TEACHER_CFG,
            "runs_128": args.n_128,
            "runs_256": args.n_256,
        },
        "lora": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "steps": args.steps, "lr": args.lr},
        "seconds": {"teacher": round(t_data, 1), "train": round(t_train, 1)},
        "loss": history,
    }
    if args.measure_n:
        report["measured_256"] = measure(args.measure_n, 256)
        log(json.dumps(report["measured_256"]))
    OUT.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
