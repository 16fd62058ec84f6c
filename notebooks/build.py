"""Write the guided notebooks from the cell lists below and execute them, storing their outputs.

    python notebooks/build.py            # all notebooks
    python notebooks/build.py 01_setup   # one

The stored outputs are what ``pytest --nbval`` compares on every change (with ``notebooks/sanitize.cfg``
for what honestly varies). Rebuild after changing what a notebook shows, and review the diff.
Cells tagged ``nbval-ignore-output`` show pictures or widgets; every other output is compared.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = "qwennb/qwennb"  # GitHub owner/name for the Colab badges
IGNORE = {"tags": ["nbval-ignore-output"]}


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str, ignore_output: bool = False) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text.strip())
    if ignore_output:
        cell.metadata.update(IGNORE)
    return cell


def badge(name: str) -> str:
    return (
        f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb)"
    )


# What every notebook says about the model it runs on without real weights.
TOY = """
**Without real weights** qwennb loads its embedded **toy** model (25 MB, in the package): Qwen-Image's own classes
at a small size, trained on a toy world of one flat-coloured shape (circle, square, triangle or star, in eight
colours, at the left, right, top, bottom or centre) on a white, gray, black or beige background, from English and
Chinese captions. It is a toy world, not Qwen-Image: it draws the colour, shape, position and background a prompt
names (right in 93-100% of prompts worded unlike its training captions), and a prompt from outside its world (a
fox, a landscape) gives a random shape. So
the prompts here are toy-world prompts, and each picture can be checked against its prompt. **With real weights
the same cells run Qwen-Image** (write your own prompts there).
"""

INSTALL = code(
    """
# Installs qwennb only where it is missing (Colab, a fresh kernel); does nothing here otherwise.
try:
    import qwennb
except ImportError:
    %pip install -q "qwennb @ git+https://github.com/qwennb/qwennb"
    import qwennb
"""
)

NOTEBOOKS: dict[str, list[nbformat.NotebookNode]] = {}

NOTEBOOKS["00_quickstart"] = [
    md(
        f"""
# Quickstart: from nothing to an image and its timing plot

{badge("00_quickstart")}

Three cells. The first loads qwennb: it looks at the machine, plans how Qwen-Image fits and loads it, and says
which model it loaded. The second generates. The third plots where the time went.
"""
    ),
    md(TOY),
    code(
        """
try:
    import qwennb
except ImportError:
    %pip install -q "qwennb @ git+https://github.com/qwennb/qwennb"
%load_ext qwennb
"""
    ),
    code(
        """
%%qwen_generate --seed 42 --no-save
a red circle on the left, white background
"""
    ),
    code(
        """
result = _
result.timing_figure()
""",
        ignore_output=True,
    ),
    md(
        """
**Next:** `01_setup.ipynb` explains what `%load_ext` found and decided, where images are saved and how to
regenerate one from its PNG.
"""
    ),
]

NOTEBOOKS["01_setup"] = [
    md(
        f"""
# Setup: install, detection, the plan, a first image

{badge("01_setup")}

What you will learn:
1. how qwennb is installed (and why the first cell is safe to run anywhere),
2. what `%load_ext qwennb` detects and how it decides where each part of Qwen-Image lives,
3. how to generate from a cell, where the images are saved, and how to regenerate one exactly from its PNG.
"""
    ),
    INSTALL,
    md(
        """
## 1. Load the extension

`%load_ext qwennb` detects the GPU, plans, and starts loading the model on a thread: it returns at once, the next
cells run meanwhile, and the first qwennb command waits for the model (saying so, then how long the load took).
Which model: `%config QwenMagics.model`, the
`QWENNB_MODEL` environment variable, a complete Qwen-Image snapshot in the Hugging Face cache, or else the
embedded **toy** model, loaded with `QwenImagePipeline.from_pretrained` from its folder as real weights are.
This notebook runs unchanged on a GPU with the real weights.
"""
    ),
    md(TOY),
    code("%load_ext qwennb"),
    md(
        """
## 2. What detection found

Everything comes from the driver (NVML) and torch: names, memory, compute capability, bf16 support, the PCIe
link. On a machine without a GPU it says so and carries on.
"""
    ),
    code(
        """
from qwennb.hardware import detect

hw = detect()
print("GPUs:", [f"{g.name} ({g.total_memory_gb:.0f} GiB, bf16={g.bf16})" for g in hw.gpus] or "none")
print("front end:", hw.frontend)
for note in hw.notes:
    print("note:", note)
"""
    ),
    md(
        """
## 3. The plan and why

The plan is computed from the memory budget, not from a table of card names: every arrangement of the three
components (transformer, text encoder, VAE) is costed in GPU memory, host memory and time per step, and the
fastest that fits wins. `%qwen plan` shows the loaded one; `%qwen info` reads back what is really active.
"""
    ),
    code("%qwen plan"),
    code("%qwen info"),
    md(
        """
The same plan, for a card you do not have (here a 24 GB card on a 64 GB host): the transformer no longer fits
whole in bf16, so the plan prices every way to hold it (fp8, blocks streamed, the text encoder streamed once a
prompt) and says where the predicted seconds go and what it assumed about the card.
"""
    ),
    code(
        """
from qwennb.display import plan_text
from qwennb.plan import describe_machine, make_plan

print(plan_text(make_plan(describe_machine(gpu_memory_gb=24, host_ram_gb=64), "qwen-image")))
"""
    ),
    md(
        """
## 4. A first image

The cell body is the prompt. Options: `--steps --cfg --seed --size --aspect --negative --preset --n --out
--no-save --enhance` (`%%qwen_generate?` lists them). `{name}` is filled from your variables.
"""
    ),
    code('colour = "yellow"'),
    code(
        """
%%qwen_generate --seed 7
a {colour} star at the top, black background
"""
    ),
    md(
        """
## 5. Where images go, and regenerating one from its PNG

Images are saved to `outputs/` (`%config QwenMagics.save_dir = "..."`), named by time and seed, never
overwriting a file. Every parameter, the model and qwennb's version are stored in the PNG's text chunks
(`%config QwenMagics.embed_metadata = False` to opt out), so the PNG alone is enough to make the same image
again.
"""
    ),
    code(
        """
import numpy as np

first = _
params = qwennb.load_params(first.paths[0])
print(params)
"""
    ),
    code(
        """
ext = get_ipython().magics_manager.registry["QwenMagics"]
again = ext.session.generate(**params)
# The same parameters give the same picture: pixel for pixel on a GPU and nearly always on the CPU (qwennb sets
# MKL_CBWR=AUTO,STRICT at import), but on a busy CPU a few dozen pixels have now and then come out one level of 255
# apart (twice in many test runs): "the same" here is every pixel within one level.
a, b = np.asarray(first.images[0]).astype(int), np.asarray(again.images[0]).astype(int)
print("same picture:", int(np.abs(a - b).max()) <= 1)
if int(np.abs(a - b).max()) > 1:  # say how far apart, should it ever happen
    print("pixels that differ:", int((a != b).any(-1).sum()), "largest difference:", int(np.abs(a - b).max()))
"""
    ),
    md(
        """
**Next:** `02_optimization.ipynb`: presets, overrides, and plans for 80 to 12 GB cards side by side.
"""
    ),
]

NOTEBOOKS["02_optimization"] = [
    md(
        f"""
# Optimization: presets, overrides, and what fits where

{badge("02_optimization")}

What you will learn:
1. what the presets trade (steps and CFG against time),
2. how to override any choice of the plan with `OptimizationConfig`,
3. how the plan changes from an 80 GB card down to 12 GB, in a table and a chart,
4. how to measure per-step time of two configurations on your machine,
5. what each optimisation does and when it is lossless.

Sections 2 and 3 plan Qwen-Image for cards described in code (nothing is loaded for them); section 4 measures
the model this machine loaded (Qwen-Image with real weights, else the toy model below).
"""
    ),
    md(TOY),
    INSTALL,
    code("%load_ext qwennb"),
    md(
        """
## 1. Presets

A preset sets steps and CFG; options you give explicitly always win. Time grows with steps, and CFG > 1 runs the
transformer twice a step (with and without the prompt).
"""
    ),
    code("%qwen presets"),
    md(
        """
## 2. Overriding the plan

`OptimizationConfig` keeps the original project's fields (`enable_tf32`, `enable_cpu_offload`, `optimal_steps`,
...) and adds the modern ones (`transformer_placement`, `storage_dtype`, `compile`, `attention_backend`, ...).
Every field left at `None` is the plan's to decide; a field you set wins, and the plan says so.
"""
    ),
    code(
        """
from qwennb import OptimizationConfig
from qwennb.plan import describe_machine, make_plan

card = describe_machine(gpu_memory_gb=80, compute_capability="9.0", sm_count=132, max_sm_clock_mhz=1980, pcie_gen=5)
custom = make_plan(card, "qwen-image", OptimizationConfig(optimal_steps=30, enable_cpu_offload=True))
print(custom.arrangement)
print(custom.defaults)
print([r for r in custom.reasons if "user" in r])
"""
    ),
    md(
        """
## 3. Plans for 80, 48, 24, 16 and 12 GB side by side

The same H100-class compute and PCIe 5 link with less memory each time (as a process capped with
`torch.cuda.set_per_process_memory_fraction` sees it). Estimated peak memory always stays under the budget.
"""
    ),
    code(
        """
rows = []
plans = {}
for gb in (80, 48, 24, 16, 12, 8):
    hw = describe_machine(gpu_memory_gb=gb, compute_capability="9.0", sm_count=132, max_sm_clock_mhz=1980,
                          pcie_gen=5, host_ram_gb=128)
    plans[gb] = p = make_plan(hw, "qwen-image")
    rows.append(f"{gb:>3} GB | {p.estimated_peak_gpu_gb:5.1f} GiB | {p.estimated_s_per_step:.2f} s/step | {p.arrangement}")
print("card   | est. peak | est. speed  | arrangement")
print("\\n".join(rows))
"""
    ),
    code(
        """
from matplotlib.figure import Figure

fig = Figure(figsize=(7, 3))
ax = fig.add_subplot()
labels = [f"{gb} GB" for gb in plans]
bottom = [0.0] * len(plans)
for comp, color in (("transformer", "#4c72b0"), ("text_encoder", "#dd8452"), ("vae", "#55a868")):
    vals = [p.components[comp].gpu_gb for p in plans.values()]
    ax.bar(labels, vals, bottom=bottom, label=comp, color=color)
    bottom = [b + v for b, v in zip(bottom, vals)]
ax.plot(labels, [p.budget_gb for p in plans.values()], "k_", markersize=30, label="budget")
ax.set_ylabel("GiB on the GPU (weights)")
ax.legend(fontsize=8)
fig
""",
        ignore_output=True,
    ),
    md(
        """
## 4. Measuring two configurations on this machine

Per-step times are measured with the GPU synchronised after every step, so they are real. Here: CFG 4 (two
transformer passes a step) against CFG 1 (one pass) on the loaded model, same prompt and seed.
"""
    ),
    code(
        """
ext = get_ipython().magics_manager.registry["QwenMagics"]
session = ext.session
prompt = "a small purple square at the centre, white background"
runs = {}
for cfg in (4.0, 1.0):
    session.generate(prompt, cfg=cfg, seed=3, steps=2)  # warm-up
    runs[cfg] = session.generate(prompt, cfg=cfg, seed=3)
for cfg, r in runs.items():
    print(f"CFG {cfg}: {r.transformer_passes_per_step} transformer passes a step, median {r.median_step_s:.4f} s/step")
"""
    ),
    md(
        """
CFG costs a second pass a step, and buys adherence. On the toy model the difference is small: with this seed both
draw the small purple square at the centre (on held-out prompts CFG 1 gets the shape right 94% of the time, CFG 4
99%).
On Qwen-Image CFG matters more: 2.5-5 is its range, and 1 turns guidance off.
"""
    ),
    code(
        """
fig = Figure(figsize=(9, 2.8))
ax = fig.add_subplot(1, 4, (1, 2))
for cfg, r in runs.items():
    ax.plot(range(1, len(r.step_times_s) + 1), r.step_times_s, marker="o", label=f"CFG {cfg}")
ax.set_xlabel("step"); ax.set_ylabel("seconds"); ax.legend()
for i, cfg in enumerate((1.0, 4.0)):
    pic = fig.add_subplot(1, 4, i + 3)
    pic.imshow(runs[cfg].images[0]); pic.set_title(f"CFG {cfg:g}", fontsize=9); pic.set_xticks([]); pic.set_yticks([])
fig.tight_layout()
fig
""",
        ignore_output=True,
    ),
    md(
        """
## 5. What each optimisation does

| optimisation | what it does | lossless? |
| --- | --- | --- |
| everything on the GPU in bf16 | no copies, no conversions | yes (the reference) |
| TF32, cuDNN benchmark | faster fp32 matmuls, tuned conv kernels | yes for a bf16 model |
| qwennb's tuned path (`compile`, on by default on a GPU) | compiles one shared block function, RoPE in real arithmetic, GELU fused into the matmul, modulation once per image, CFG's two passes as one batch (0.370 → 0.250 s/step measured on an H100, speed run 8) | yes, rounding-level |
| fp8 matmuls (`fp8_matmul=True`; the plan's choice below 48 GB on Ada/Hopper) | fp8 weights (replacing the bf16 ones: the blocks take half the memory) and fp8 tensor-core products (0.208 s/step on an H100 in speed run 6, measured with the bf16 weights still held; 0.29-0.30 with a 24 GB cap, memory-tiers runs C and D) | no: drift 3x rounding |
| text encoder streamed (group offload) | keeps 15 GiB off the GPU; costs a copy once per prompt | yes |
| transformer streamed with resident blocks | keeps part of it on the host, copies the rest each step over PCIe, overlapped | yes |
| fp8 storage (layerwise casting; older cards) | halves the transformer's memory; weights rounded to fp8, upcast per layer (slow) | no: outputs change slightly |
| NF4 / int8 quantisation | quarter / half the memory | no |
| step caching (`cache=...`) | skips work between similar steps | no |

Three named **modes** set these for you: `%qwen load qwen-image mode=turbo` (fp8 matmuls), `mode=turbo-cache`
(TaylorSeer, for 50-step schedules) and `mode=exact` (bf16 only, even where that means streaming);
`%config QwenMagics.mode = "turbo"` makes one the default, `%qwen presets` lists them with their measured cost.

**Next:** `03_multimodal.ipynb` (prompt enhancement) or `04_migration.ipynb` (from the old setup).
"""
    ),
]

NOTEBOOKS["03_multimodal"] = [
    md(
        f"""
# Multimodal: better prompts and reference images with Qwen VL

{badge("03_multimodal")}

What you will learn:
1. how to turn a short prompt into a detailed one with the model you already loaded (Qwen-Image's text encoder
   is a full Qwen2.5-VL chat model),
2. how Chinese prompts and text to render in quotes are handled,
3. how to describe a reference image and use the description as a prompt,
4. what happens when a rewrite or a description is unusable.

**What needs the real model.** Prompt enhancement and image description need a real Qwen VL model: Qwen-Image's own
text encoder (Qwen2.5-VL-7B, loaded with the real weights) or a separate Qwen2.5-VL-7B / Qwen2-VL-7B
(`qwennb.enhance.load_vl_model`). Without them the same code runs, but on stand-ins whose text is meaningless: the
toy model's text encoder was trained only to condition its pictures (its chat head and vision tower are
untrained), and the offline VL stand-ins `tiny-vl` / `tiny-vl2` have random weights. So below every rewrite and
description is rejected and qwennb falls back to your own words, saying why: that fallback is what this notebook
can show without the real model. The pictures come from the toy model (see below) and answer their prompts.
"""
    ),
    md(TOY),
    INSTALL,
    code("%load_ext qwennb"),
    md(
        """
## 1. Enhancing a prompt

`enhance_prompt` hands the text encoder a system prompt of qwennb's own (keep the meaning and proper nouns;
make subject, style, composition and lighting concrete; keep text to render in quotes, untranslated; under 200
words) and decodes greedily, so the same prompt gives the same rewrite. Here is the exact chat it sends:
"""
    ),
    code(
        """
from qwennb.enhance import enhance_prompt

ext = get_ipython().magics_manager.registry["QwenMagics"]
pipe = ext.session.pipe
e = enhance_prompt('A shop window with a neon sign that reads "OPEN 24/7"', pipe=pipe, max_new_tokens=64)
for m in e.chat:
    print(f"--- {m['role']}\\n{m['content'] if isinstance(m['content'], str) else m['content']}")
"""
    ),
    md(
        """
With real weights the answer is a detailed prompt. Here (no real VL model) it is meaningless, and qwennb refuses
to use it: an empty, repetitive, garbled or over-long rewrite falls back to your prompt, with the reason.
"""
    ),
    code(
        """
print("original:", e.original)
print("enhanced:", e.enhanced)
print("language:", e.language, "| model:", e.model)
print("fallback:", e.fallback_reason)
"""
    ),
    md(
        """
## 2. Chinese prompts and text rendering

Any CJK character switches to a Chinese system prompt and the Chinese positive-magic suffix. Text in quotes is
kept as written (never translated): Qwen-Image renders it (the toy model draws no text).
"""
    ),
    code(
        """
zh = enhance_prompt('一家咖啡店门口的黑板上写着"通义千问咖啡 2元一杯"', pipe=pipe, max_new_tokens=64)
print("language:", zh.language)
print("system prompt starts:", zh.chat[0]["content"][:40])
"""
    ),
    md(
        """
`%%qwen_generate --enhance` does both steps and keeps the original and the enhanced prompt in the result and in
the PNG's metadata. Here the rewrite falls back to the prompt as written, a Chinese one (the toy model was
trained on Chinese captions too: a blue star at the top on black); with real weights Qwen-Image draws the
enhanced prompt.
"""
    ),
    code(
        """
%%qwen_generate --enhance --seed 3 --no-save
一个蓝色的星形在上面，黑色背景
"""
    ),
    md(
        """
## 3. A reference image as a prompt

`describe_image(image, focus="content")` asks what is in the image; `focus="style"` asks for style, palette,
lighting and composition, to add to a prompt of your own. Images can be PIL images, paths or bytes; large images
are resized to the processor's limits. Qwen-Image's text encoder has Qwen2.5-VL's vision tower, so with real
weights no second model is needed; a separate `qwen2-vl-7b` or `qwen2.5-vl-7b` can be loaded with
`qwennb.enhance.load_vl_model(...)`. The reference here is a toy-world picture drawn by `qwennb.toy.render`.
"""
    ),
    code(
        """
from qwennb import toy
from qwennb.enhance import describe_image

reference = toy.render(toy.Scene(shape="circle", colour="orange", position="right", size="large", background="beige"))
d = describe_image(reference, focus="content", pipe=pipe, max_new_tokens=48)
print("image resized to:", d.image_size_used, "->", d.image_tokens, "image tokens")
print("description:", repr(d.text))
print("problem:", d.problem)
"""
    ),
    md(
        """
With the real model `d.text` describes the orange circle; here it is unusable, so the prompt falls back to the
words you would have written:
"""
    ),
    code(
        """
prompt = d.text or "an orange circle on the right, beige background"  # your own words when it is unusable
r = ext.session.generate(prompt, seed=5)
print(r.prompt)
r
"""
    ),
    md(
        """
**Next:** `04_migration.ipynb`, or `qwennb enhance "a prompt" --json` from a terminal.
"""
    ),
]

NOTEBOOKS["04_migration"] = [
    md(
        f"""
# Migration: from `DiffusionPipeline("Qwen/Qwen-Image-Edit")` and `guidance_scale` to qwennb

{badge("04_migration")}

What you will learn:
1. why Qwen-Image-Edit is the wrong model for text-to-image,
2. how `guidance_scale` maps to Qwen-Image's `true_cfg_scale` (and the trap that silently turns CFG off),
3. that the original project's `PipelineOptimizer` / `ModelDetectionService` code runs with only its import
   line changed.

Without real weights the cells that load a model load the embedded **toy** model (a toy world of one flat shape
on a plain background, not Qwen-Image; see `00_quickstart`); with real weights they load Qwen-Image. This notebook
shows no pictures: what it checks (notices, transformer passes, the size) is the same on either.
"""
    ),
    INSTALL,
    md(
        """
## The old setup

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("Qwen/Qwen-Image-Edit")
image = pipe(prompt="...", guidance_scale=7.5)
```

Two problems. **Qwen-Image-Edit** is trained to edit an input image: used for text-to-image it is the wrong
model (same 57 GB size class, worse results). And **`guidance_scale` does nothing** for Qwen-Image: its
classifier-free guidance is `true_cfg_scale`, and it only runs when a negative prompt is given too.
"""
    ),
    code(
        """
from qwennb import ModelDetectionService
from qwennb.plan import describe_machine

svc = ModelDetectionService(hardware=describe_machine(gpu_memory_gb=80, compute_capability="9.0",
                                                      sm_count=132, max_sm_clock_mhz=1980, pcie_gen=5))
print(svc.analyze_performance_characteristics("qwen-image-edit")["warnings"])
"""
    ),
    md(
        """
## `guidance_scale` → `true_cfg_scale`

qwennb accepts `guidance_scale=` from old code and uses it as `true_cfg_scale`, with a one-line notice. (7.5 is
high for Qwen-Image; 2.5-5 is its range.) It also always supplies the negative prompt `" "` when CFG > 1, so
CFG really runs: count the transformer passes.
"""
    ),
    code("%load_ext qwennb"),
    code(
        """
ext = get_ipython().magics_manager.registry["QwenMagics"]
old_style = ext.session.generate("a green square on the right, gray background", guidance_scale=7.5, seed=3, steps=4)
print(old_style.notices)
print("CFG", old_style.cfg, "->", old_style.transformer_passes_per_step, "transformer passes a step")
"""
    ),
    md(
        """
## The original project's code, with only the import line changed

This is the "Basic Optimized Generation" example of the original guide. Its first line was
`from src.pipeline_optimizer import ...`; everything else is unchanged. Without real weights
`detect_current_model()` finds the toy model, so it runs there (its landscape prompt is outside the toy's world,
and 1024x1024 is four times the toy's side: this cell takes the longest here, about a minute on a 2-core CPU).
"""
    ),
    code(
        """
from qwennb import PipelineOptimizer, OptimizationConfig, ModelDetectionService

# Detect and load optimal model
detector = ModelDetectionService()
current_model = detector.detect_current_model()

# Create optimized configuration
config = OptimizationConfig(
    architecture_type="MMDiT",
    enable_attention_slicing=False,  # Disabled for performance
    enable_vae_slicing=False,        # Disabled for performance
    enable_tf32=True,                # Enabled for RTX GPUs
    enable_cudnn_benchmark=True      # Enabled for consistent inputs
)

# Create optimized pipeline
optimizer = PipelineOptimizer(config)
pipeline = optimizer.create_optimized_pipeline(
    current_model.path,
    "MMDiT"
)

# Generate image
image = pipeline(
    prompt="A beautiful landscape with mountains and lakes",
    width=1024,
    height=1024,
    num_inference_steps=20,
    true_cfg_scale=3.5  # MMDiT uses true_cfg_scale
).images[0]
print(image.size)
"""
    ),
    md(
        """
Note diffusers' warning above: the original example passes `true_cfg_scale=3.5` **without a negative
prompt**, so diffusers silently runs without guidance. `qwennb.generate` (and `%%qwen_generate`) fixes that.
The other examples of the guide run the same way:
"""
    ),
    code(
        """
perf_chars = detector.analyze_performance_characteristics(current_model)
architecture = detector.detect_model_architecture(current_model)
print(f"Model: {current_model.name}")
print(f"Architecture: {architecture}")
print(f"Expected performance: {perf_chars['expected_generation_time']}")
print(f"Bottlenecks: {perf_chars['bottlenecks']}")
validation = optimizer.validate_optimization(pipeline)
print(f"Optimization status: matches plan = {validation['matches_plan']}")
"""
    ),
    md(
        """
| old | qwennb |
| --- | --- |
| `DiffusionPipeline.from_pretrained("Qwen/Qwen-Image-Edit")` | `%load_ext qwennb` (Qwen-Image, planned for your card) |
| `guidance_scale=7.5` | `--cfg 4` / `cfg=4.0` (`true_cfg_scale`), negative prompt supplied |
| `from src.pipeline_optimizer import ...` | `from qwennb import ...` |
| `python tools/download_qwen_image.py --optimal` | `qwennb download --optimal` |

**Next:** back to `00_quickstart.ipynb`, or `02_optimization.ipynb` for what the plan does on your card.
"""
    ),
]

NOTEBOOKS["05_editing"] = [
    md(
        f"""
# Editing: images in, images out

{badge("05_editing")}

What you will learn:
1. how to edit the last result, a variable or a file with `%%qwen_edit` (Qwen-Image-Edit-2511/2509: up to 3
   reference images; the first Qwen-Image-Edit: one),
2. what the output size is and why (the input's, rounded to multiples of 16, said in one line),
3. how each input is recorded in the result and the PNG (its sha256),
4. image-to-image and inpainting with `%%qwen_generate --init-image ... --strength ... --mask ...`,
5. how bad inputs are refused before any model loads.

Without real weights everything here runs on the embedded toy models, so every picture can be checked against
what it was asked for: text-to-image, image-to-image and inpainting on **`toy`** (a toy world of one flat shape on
a plain background, not Qwen-Image: see below), and editing on **`toy-edit`**, the toy model fine-tuned to carry
out edits of that world (recolour, reshape, move, resize, change the background; English or Chinese), in
Qwen-Image-Edit-2509/2511's own pipeline. With real weights, name `qwen-image-edit-2511` instead.
"""
    ),
    md(TOY),
    INSTALL,
    code("%load_ext qwennb"),
    md(
        """
## 1. Edit the last result

Make an image, then edit it: `--image _` takes the last result. The loaded model is a text-to-image model, so
`--model` names the edit model to load; qwennb says what the two share and what is swapped (here the VAE and text
encoder are the same files; the transformer is swapped).
"""
    ),
    code(
        """
%%qwen_generate --seed 1 --no-save
a red circle on the left, white background
"""
    ),
    code(
        """
%%qwen_edit --image _ --model toy-edit --seed 2 --no-save
make the circle blue
"""
    ),
    md(
        """
The edit kept the input's size (256x256), and the notes say so; they also say when the model would see a
reference at a slightly different aspect ratio (so content could shift, as in the next section): nothing is
resized silently. `qwennb.toy.read_image` reads the picture back:
"""
    ),
    code(
        """
from qwennb import toy

print(toy.read_image(_.images[0]).attributes())
"""
    ),
    md(
        """
One start image, five edits (each kind the toy edit model learned, the last in Chinese), each read back:
"""
    ),
    code(
        """
from matplotlib.figure import Figure
from qwennb.edit import edit

pipe = get_ipython().magics_manager.registry["QwenMagics"].session.pipe
start = toy.render(toy.Scene(shape="star", colour="yellow", position="center", size="large", background="gray"))
asks = ["make it purple", "move the star to the left", "turn the star into a square", "make the star smaller",
        "把背景换成白色"]
fig = Figure(figsize=(12, 2.6))
for i, ask in enumerate(["(start)", *asks]):
    image = start if i == 0 else edit(pipe, [start], ask, seed=10 + i).images[0]
    seen = toy.read_image(image)
    print(f"{ask:<30} {seen.colour} {seen.shape}, {seen.position}, {seen.size}, {seen.background} background")
    title = ask if ask.isascii() else "background to white (zh)"
    ax = fig.add_subplot(1, 6, i + 1); ax.imshow(image); ax.set_title(title, fontsize=8); ax.axis("off")
fig
"""
    ),
    md(
        """
The read-backs show what this early toy edit model can and cannot do (training/toy/EDIT.md has the numbers): each
asked-for change happens here (colour, place, shape, size, background), and what was not asked for (the yellow, the
place, the size, the gray) stays; the star itself survives being recoloured, resized and a new background, but
moved it comes back as a rounded blob (read as a circle). Over 120 held-out edits (128x128 and 256x256) it makes the
asked-for change in 89%, keeps the rest in 80% and gets the whole edit right in 73% at its default 10 steps and
CFG 1 (no CFG:
with CFG 4, true CFG pushes the picture away from the unchanged source and loses what it should keep). The edit
pipeline, sizes, hashes and messages are those of the real edit models.
"""
    ),
    md(
        """
## 2. Several reference images, from variables, files or bytes

2509 and 2511 take up to three references ("Picture 1", "Picture 2", ... in the instruction); so does `toy-edit`,
which runs their pipeline, but it was trained on one reference only: here it shows the mechanics (sizes, hashes),
not a meaningful picture. `--image` takes
`_`, a variable (PIL image, numpy array, image bytes, a result) or a path.
"""
    ),
    code(
        """
import io
import numpy as np
from PIL import Image

person = Image.new("RGB", (96, 128), (200, 160, 120))
hat = np.zeros((64, 64, 3), np.uint8); hat[16:48, 8:56] = (20, 20, 160)
buf = io.BytesIO(); Image.new("RGB", (80, 80), (30, 140, 60)).save(buf, format="PNG")
background = buf.getvalue()
Image.new("RGB", (64, 64), "white").save("/tmp/qwennb-note.png")
"""
    ),
    code(
        """
%%qwen_edit --image person --image hat --image background --seed 3 --steps 4 --no-save
Picture 1 wears the hat from picture 2 in the garden of picture 3
"""
    ),
    code(
        """
r = _
for x in r.inputs:
    print(f"{x['role']:<8} {x['source']:<10} {x['width']}x{x['height']}  sha256 {x['sha256'][:16]}...")
print("output:", r.images[0].size, "| steps:", len(r.step_times_s), "| model:", r.model)
"""
    ),
    md(
        """
## 3. The Python API and provenance

`qwennb.edit(pipe, images, instruction, ...)` returns the same `GenerationResult` as `qwennb.generate`. Saved
PNGs carry the parameters and every input's sha256 (of its decoded pixels: the same for a file, its bytes or a
PIL copy), so you can check which inputs made an image.
"""
    ),
    code(
        """
import tempfile
import qwennb
from qwennb.edit import edit, image_sha256, load_provenance

pipe = get_ipython().magics_manager.registry["QwenMagics"].session.pipe
result = edit(pipe, [person, "/tmp/qwennb-note.png"], "put the note in their hand", steps=4, seed=7)
(path,) = result.save(tempfile.mkdtemp())
meta = load_provenance(path)
print("task:", meta["task"], "| seed:", meta["seed"], "| steps:", meta["steps"], "| cfg:", meta["cfg"])
print("input 1 is `person`:", meta["inputs"][0]["sha256"] == image_sha256(person))
print("input 2 source:", meta["inputs"][1]["source"])
"""
    ),
    md(
        """
## 4. Image-to-image and inpainting

These run on a text-to-image model with the same weights (`QwenImageImg2ImgPipeline` /
`QwenImageInpaintPipeline`, built from the loaded components: nothing is loaded twice). `--strength` is the
share of the schedule that redraws the image: 0.3 runs the last 30% of the steps and keeps the layout, 1.0 starts
from noise.

First back to a text-to-image model: the toy here, explicitly (with real weights, `%qwen load qwen-image`).
"""
    ),
    code(
        """
%qwen load toy
"""
    ),
    md(
        """
The start image is a blue square on the left (drawn by `qwennb.toy.render`); the prompt asks for a red circle on
the right. The more of the schedule runs, the more of the prompt wins over the start image: at 0.3 the square
keeps its place and shape and turns red, at 0.6 it is a red shape rounding off in the same place, at 1.0 the toy
draws the prompt's red circle on the right.
"""
    ),
    code(
        """
from matplotlib.figure import Figure
from qwennb import toy

start = toy.render(toy.Scene(shape="square", colour="blue", position="left", size="large", background="white"))
pipe = get_ipython().magics_manager.registry["QwenMagics"].session.pipe
fig = Figure(figsize=(8, 2.4))
for i, s in enumerate((0.3, 0.6, 1.0)):
    r = qwennb.generate(pipe, "a red circle on the right, white background", init_image=start, strength=s,
                        steps=10, seed=4)
    print(f"strength {s}: {len(r.step_times_s)} of {r.steps} steps ran, output {r.images[0].size}")
    ax = fig.add_subplot(1, 4, i + 2); ax.imshow(r.images[0]); ax.set_title(f"strength {s}", fontsize=9); ax.axis("off")
ax = fig.add_subplot(1, 4, 1); ax.imshow(start); ax.set_title("start", fontsize=9); ax.axis("off")
fig
"""
    ),
    md(
        """
Inpainting redraws only the white part of the mask (here the right half) and keeps the rest exactly:
"""
    ),
    code(
        """
mask = np.zeros((256, 256), np.uint8); mask[:, 128:] = 255   # white: redraw, black: keep
r = qwennb.generate(pipe, "a red circle on the right, white background", init_image=start, mask=mask,
                    strength=1.0, steps=10, seed=5)
out, before = np.asarray(r.images[0]).astype(int), np.asarray(start).astype(int)
print("unmasked pixels changed by at most:", int(np.abs(out - before)[mask == 0].max()))
print("masked pixels redrawn:", float(np.abs(out - before)[mask == 255].mean()) > 10)
"""
    ),
    code(
        """
%%qwen_generate --init-image start --mask mask --strength 1.0 --steps 10 --seed 6 --no-save
a yellow circle on the right, white background
"""
    ),
    md(
        """
## 5. Bad inputs get one line, before anything loads

In the magics they are `UsageError`s; in the CLI one line and exit status 2; in Python `ImageInputError` (a
`QwennbError`):
"""
    ),
    code(
        """
from qwennb.edit import ImageInputError, check_edit_inputs, check_strength, read_image, read_mask

for attempt in (
    lambda: read_image("/no/such/photo.png"),
    lambda: read_image(b"not an image"),
    lambda: read_mask(np.zeros((64, 64), np.uint8), (128, 128)),
    lambda: check_edit_inputs("qwen-image-edit-2511", [person] * 4, "x"),
    lambda: check_strength(1.5),
):
    try:
        attempt()
    except ImageInputError as e:
        print(e)
"""
    ),
    md(
        """
From a terminal: `qwennb edit photo.png "make it blue" --model qwen-image-edit-2511 --json`, and
`qwennb generate "a prompt" --init-image photo.png --strength 0.5 [--mask mask.png]`.

**Next:** `02_optimization.ipynb` for how the plan fits a model (edit models count their reference images'
tokens), or back to `00_quickstart.ipynb`.
"""
    ),
]


def build(name: str, cells: list[nbformat.NotebookNode]) -> float:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    path = HERE / f"{name}.ipynb"
    t0 = time.perf_counter()
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    elapsed = time.perf_counter() - t0
    for cell in nb.cells:  # keep the files small and the diffs readable
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = argv or list(NOTEBOOKS)
    for name in names:
        print(f"{name}: {build(name, NOTEBOOKS[name]):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
