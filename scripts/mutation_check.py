"""A small, rerunnable mutation check: break the code one line at a time and see whether the tests notice.

Each mutation below replaces one exact snippet of a module (generation, the tuned path in speed, plan, presets)
with a broken version, in a temporary copy of the repository, and runs only the tests that cover that place.
A mutation is *caught* when those tests fail, *survived* when they pass, and *stale* when its snippet is no
longer in the module (the code moved on: update the list).

    python scripts/mutation_check.py                 # all mutations, a summary at the end
    python scripts/mutation_check.py --only speed    # the mutations of one module
    python scripts/mutation_check.py --write tests/MUTATION.md   # also record the table

Runs on the CPU with the tiny model; about 15-20 minutes for the whole list on 2 cores (each run starts a
fresh pytest, so a mutation never leaks into the next).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    module: str  # path under the repository
    old: str  # an exact snippet, found once
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions


GEN = "qwennb/generation.py"
SPEED = "qwennb/speed.py"
PLAN = "qwennb/plan.py"
PRESETS = "qwennb/presets.py"
BATCH = "qwennb/batch.py"
CLI = "qwennb/cli.py"
MAGICS = "qwennb/magics.py"
T_BREAKS = "tests/test_generation_breaks.py"
T_GEN = "tests/test_generation.py"
T_SPEED = "tests/test_speed.py"
T_PARALLEL = "tests/test_parallel.py"
# The stored plan outputs of 02_optimization (peaks and s/step for 80-12 GB), compared by nbval: a constant of the
# plan's cost model that moves shows there.
NB_PLAN = ("notebooks/02_optimization.ipynb", "--nbval", "--nbval-sanitize-with", "notebooks/sanitize.cfg")

MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------- generation
    Mutation(
        "second Ctrl-C ignored",
        GEN,
        "            signal.signal(signal.SIGINT, previous)\n            raise KeyboardInterrupt",
        "            pass",
        (T_BREAKS, "-k", "ctrl_c"),
    ),
    Mutation(
        "first Ctrl-C does not ask to stop",
        GEN,
        "            raise KeyboardInterrupt\n        stop.set()",
        "            raise KeyboardInterrupt",
        (T_BREAKS, "-k", "ctrl_c"),
    ),
    Mutation(
        "SIGINT handler not put back",
        GEN,
        "    finally:\n        signal.signal(signal.SIGINT, previous)",
        "    finally:\n        pass",
        (T_BREAKS, "-k", "ctrl_c"),
    ),
    Mutation(
        "OOM path keeps the step's latents",
        GEN,
        "    if out_of_memory:\n        last.clear()",
        "    if out_of_memory:\n        pass",
        (T_BREAKS, "-k", "out_of_memory"),
    ),
    Mutation(
        "OOM path frees no memory",
        GEN,
        "        last.clear()\n        free_memory()\n        raise GenerationError(",
        "        last.clear()\n        raise GenerationError(",
        (T_BREAKS, "-k", "out_of_memory"),
    ),
    Mutation(
        "OOM error raised inside the except block (keeps the frames as context)",
        GEN,
        "        out_of_memory = True\n",
        "        out_of_memory = True\n        raise GenerationError('out of GPU memory at 64x64 x1')\n",
        (T_BREAKS, "-k", "out_of_memory"),
    ),
    Mutation(
        "load_params swaps width and height",
        GEN,
        "    out = {k: meta[k] for k in keys if k in meta}",
        '    out = {k: meta[{"width": "height", "height": "width"}.get(k, k)] for k in keys if k in meta}',
        (T_BREAKS, "-k", "png"),
    ),
    Mutation(
        "Stop never ends the run early",
        GEN,
        "        if stop and len(step_times) < run_steps:",
        "        if False:",
        (T_GEN, "-k", "stop_signal or ctrl_c"),
    ),
    Mutation(
        "no default negative prompt: CFG silently off",
        GEN,
        '    if cfg > 1 and not negative_prompt:\n        negative_prompt = " "',
        "    if False:\n        pass",
        (T_GEN, "-k", "cfg"),
    ),
    Mutation(
        "the seed is not the generator's seed",
        GEN,
        'generator = torch.Generator(device="cpu").manual_seed(seed)',
        'generator = torch.Generator(device="cpu").manual_seed(seed + 1)',
        (T_GEN, T_BREAKS, "-k", "seed or stock"),
    ),
    Mutation(
        "size over the budget not refused",
        GEN,
        "        if need > plan.budget_gb:",
        "        if False:",
        (T_BREAKS, "-k", "budget"),
    ),
    Mutation(
        "NaN output not detected",
        GEN,
        "if latents is not None and not bool(torch.isfinite(latents).all()):",
        "if False:",
        (T_GEN, "-k", "nan"),
    ),
    Mutation(
        "one step allowed (gives NaN)",
        "qwennb/options.py",
        "    if not _whole(steps) or steps < 2:",
        "    if not _whole(steps) or steps < 1:",
        (T_GEN, T_BREAKS, "-k", "bad_options or step_counts"),
    ),
    Mutation(
        "the tuned path is always told CFG is on",
        GEN,
        "expect_cfg(pipe.transformer, cfg > 1)",
        "expect_cfg(pipe.transformer, True)",
        (T_SPEED, "-k", "generate_tells"),
    ),
    Mutation(
        "median of an even count takes the upper middle",
        GEN,
        "return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2",
        "return s[mid]",
        (T_GEN, T_BREAKS, "-k", "median or timing"),
    ),
    # ---------------------------------------------------------------- speed: the tuned path's CFG pairing
    Mutation(
        "stored half handed to a different negative prompt",
        SPEED,
        "        if same_call(stash) and _same_text(stash[4], text):",
        "        if same_call(stash):",
        (T_SPEED, "-k", "negative or batched"),
    ),
    Mutation(
        "latents version not checked",
        SPEED,
        "rec[0] is hidden_states and rec[1] == version and rec[2] == values",
        "rec[0] is hidden_states and rec[2] == values",
        (T_SPEED, "-k", "batched"),
    ),
    Mutation(
        "timestep not checked",
        SPEED,
        "rec[0] is hidden_states and rec[1] == version and rec[2] == values",
        "rec[0] is hidden_states and rec[1] == version",
        (T_SPEED, "-k", "batched"),
    ),
    Mutation(
        "expect_cfg(False) ignored",
        SPEED,
        "    solo = state.cfg_hint is False or state.cfg_solo is text",
        "    solo = state.cfg_solo is text",
        (T_SPEED, "-k", "generate_tells or batched"),
    ),
    Mutation(
        "the negative text paired with itself on new latents",
        SPEED,
        "        and not _same_text(guess, text)  # the negative text itself",
        "        and True  # the negative text itself",
        (T_SPEED, "-k", "matches_stock or negative"),
    ),
    Mutation(
        "modulation cache ignores weight versions",
        SPEED,
        "            versions = tuple(p._version for p in state.mod_params)",
        "            versions = ()",
        (T_SPEED, "-k", "modulation"),
    ),
    Mutation(
        "real RoPE sign flipped",
        SPEED,
        "def apply_rotary_emb_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:\n",
        "def apply_rotary_emb_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:\n"
        "    sin = -sin\n",
        (T_SPEED, "-k", "rope"),
    ),
    Mutation(
        "disable_fast_path leaves the tuned processors",
        SPEED,
        "    transformer.set_attn_processor(dict(state.processors))\n",
        "",
        (T_SPEED, "-k", "restores"),
    ),
    Mutation(
        "disable_fast_path under cache hooks not refused",
        SPEED,
        '        if registry is not None and getattr(registry, "hooks", None):\n            raise RuntimeError(\n'
        '                "remove diffusers hooks',
        '        if False:\n            raise RuntimeError(\n                "remove diffusers hooks',
        (T_SPEED, "-k", "caches_compose"),
    ),
    # ---------------------------------------------------------------- plan
    Mutation(
        "a card too small is not refused",
        PLAN,
        "    if not on_gpu:\n",
        "    if False:\n",
        ("tests/test_plan_refusals.py",),
    ),
    Mutation(
        "speed calibration moved 7% (EAGER_EFFICIENCY)",
        PLAN,
        "EAGER_EFFICIENCY = REF_STEP_TFLOP / (STOCK_S_PER_STEP * H100_TFLOPS)",
        "EAGER_EFFICIENCY = 1.07 * REF_STEP_TFLOP / (STOCK_S_PER_STEP * H100_TFLOPS)",
        ("tests/test_plan.py", "tests/test_plan_calibration.py", *NB_PLAN),
    ),
    Mutation(
        "memory reserve shrunk",
        PLAN,
        "RESERVE_SHARE = 0.03",
        "RESERVE_SHARE = 0.01",
        ("tests/test_plan.py", *NB_PLAN),
    ),
    Mutation(
        "lossy picked at a smaller gain",
        PLAN,
        "LOSSY_MIN_GAIN = 1.5",
        "LOSSY_MIN_GAIN = 1.1",
        ("tests/test_plan.py", T_SPEED, "-k", "plan or lossy or 48"),
    ),
    # ---------------------------------------------------------------- presets
    Mutation(
        "16:9 size swapped",
        PRESETS,
        '    "16:9": (1664, 928),',
        '    "16:9": (928, 1664),',
        (T_GEN, "tests/test_presets.py", "-k", "aspect or preset"),
    ),
    Mutation(
        "round16 rounds down",
        PRESETS,
        "    return max(16, int(round(x / 16)) * 16)",
        "    return max(16, int(x / 16) * 16)",
        (T_GEN, "tests/test_presets.py", "-k", "rounded or aspect or round"),
    ),
    Mutation(
        "ultra-fast preset steps changed",
        PRESETS,
        'Preset("ultra-fast", 12, 3.0,',
        'Preset("ultra-fast", 10, 3.0,',
        (T_GEN, "tests/test_presets.py", "-k", "preset"),
    ),
    Mutation(
        "Chinese not detected (wrong positive magic)",
        PRESETS,
        '    return any("\\u4e00" <= ch <= "\\u9fff" or "\\u3400" <= ch <= "\\u4dbf" for ch in text)',
        '    return any("\\u3400" <= ch <= "\\u4dbf" for ch in text)',
        ("tests/test_presets.py", "tests/test_enhance.py", "-k", "chinese or magic or language"),
    ),
    Mutation(
        "preset names not normalised",
        PRESETS,
        '    key = name.strip().lower().replace("_", "-")',
        "    key = name",
        ("tests/test_presets.py", T_GEN, "-k", "preset"),
    ),
    # ---------------------------------------------------------------- measured on the H200 (session 3)
    Mutation(
        "pageable streaming rate moved 7%",
        PLAN,
        "PAGEABLE_GBPS = 2.85",
        "PAGEABLE_GBPS = 3.05",
        ("tests/test_plan_calibration.py",),
    ),
    Mutation(
        "pageable copies hidden under compute",
        PLAN,
        "    elif not a.pinned:  # pinned on the fly, on the host thread: nothing hides\n        stream_s = copies\n",
        "",
        ("tests/test_plan_calibration.py",),
    ),
    Mutation(
        "CUDA_VISIBLE_DEVICES ignored",
        "qwennb/hardware.py",
        '    gpus = visible_gpus(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))\n',
        "",
        ("tests/test_hardware.py",),
    ),
    Mutation(
        "one image without CFG sent to Ulysses again",
        "qwennb/parallel.py",
        "        if ulysses is None:\n            m = ULYSSES_MEASURED",
        "        if False:\n            m = ULYSSES_MEASURED",
        ("tests/test_parallel.py", "tests/test_plan_gpus.py", "-k", "choose or spreads"),
    ),
    # ---------------------------------------------------------------- the tuned path's Ulysses (speed.py)
    Mutation(
        "Ulysses: image RoPE rows one token off",
        SPEED,
        "        rope = ((img_cos[rows], img_sin[rows]), txt_rope)",
        "        rope = ((img_cos.roll(1, 0)[rows], img_sin.roll(1, 0)[rows]), txt_rope)",
        (T_PARALLEL, "-k", "tuned_ulysses"),
    ),
    Mutation(
        "Ulysses: image tokens split one token off",
        SPEED,
        "        hidden_states = hidden_states[:, rows]  # img_in",
        "        hidden_states = hidden_states.roll(1, 1)[:, rows]  # img_in",
        (T_PARALLEL, "-k", "tuned_ulysses"),
    ),
    Mutation(
        "Ulysses: the text's heads taken from the next rank",
        SPEED,
        "    heads_here = slice(r * hl, (r + 1) * hl)",
        "    heads_here = slice((r + 1) % n * hl, ((r + 1) % n + 1) * hl)",
        (T_PARALLEL, "-k", "tuned_ulysses"),
    ),
    Mutation(
        "Ulysses: output slices gathered in reverse order",
        SPEED,
        "    return torch.cat(parts, dim=1)",
        "    return torch.cat(parts[::-1], dim=1)",
        (T_PARALLEL, "-k", "tuned_ulysses"),
    ),
    Mutation(
        "Ulysses: the text mask sized for this rank's image tokens only",
        SPEED,
        "            img_len = hidden_states.shape[1] * (ulysses.degree if ulysses is not None else 1)",
        "            img_len = hidden_states.shape[1]",
        (T_PARALLEL, "-k", "tuned_ulysses"),
    ),
    Mutation(
        "synthetic edit model's image-token ids left unaligned",
        "qwennb/stand_ins.py",
        "    align_vision_token_ids(base.text_encoder, base.tokenizer)\n",
        "",
        ("tests/test_edit.py", "-k", "synthetic_edit"),
    ),
    # ---------------------------------------------------------------- batch (and its CLI and magic)
    Mutation(
        "a new image may overwrite an existing file",
        BATCH,
        "            os.link(tmp, path)\n",
        "            os.replace(tmp, path)\n",
        ("tests/test_batch.py", "-k", "never_overwrites"),
    ),
    Mutation(
        "a rerun redoes items whose record says done but whose key changed",
        BATCH,
        '                and rec.get("key") == it.key\n',
        "",
        ("tests/test_batch.py", "-k", "resume_and_redo or changed_line"),
    ),
    Mutation(
        "--strict does not refuse a file with bad lines",
        BATCH,
        "    if strict and pset.problems:\n",
        "    if False and pset.problems:\n",
        ("tests/test_batch.py", "-k", "strict"),
    ),
    Mutation(
        "a failed item is never retried",
        BATCH,
        '    if not permanent and rec.get("attempts", 0) < max_attempts and not stop:',
        "    if False:",
        ("tests/test_batch.py", "-k", "killed"),
    ),
    Mutation(
        "the CLI's summary is not held from a late Ctrl-C",
        CLI,
        "    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)\n",
        "    previous = signal.getsignal(signal.SIGINT)\n",
        ("tests/test_batch.py", "-k", "summary_prints"),
    ),
    Mutation(
        "%qwen batch loads the model before checking the file",
        MAGICS,
        "                check_batch(args.file, args.out, **{k: v for k, v in options.items() if k in checked})\n",
        "                pass\n",
        ("tests/test_batch.py", "-k", "checks_the_file_before"),
    ),
    Mutation(
        "%%qwen_edit loads the model before checking steps, CFG and seed",
        MAGICS,
        '            validate_generate_options(\n                {\n                    "steps": options.steps,',
        '            (lambda o: o)(\n                {\n                    "steps": options.steps,',
        ("tests/test_edit.py", "-k", "refuses_bad_inputs_before_loading"),
    ),
    Mutation(
        "toy-edit looks for a text encoder of its own although it ships none",
        "qwennb/toy_edit.py",
        '"text_encoder": TOY_EDIT_DIR if _OWN_TEXT_ENCODER else TOY_MODEL_DIR,',
        '"text_encoder": TOY_EDIT_DIR,',
        ("tests/test_toy_edit.py", "-k", "text_encoder_it_was_trained"),
    ),
    Mutation(
        "generate encodes the empty negative prompt whatever the user gave",
        "qwennb/generation.py",
        "            neg = encode(negative_prompt, num_images, device) if cfg > 1 else (None, None)",
        '            neg = encode(" ", num_images, device) if cfg > 1 else (None, None)',
        ("tests/test_toy_model.py", "-k", "negative_prompt_naming"),
    ),
    Mutation(
        "the plan offers Qwen-Image-2.1 the fp8 matmuls of Qwen-Image's tuned path",
        "qwennb/plan.py",
        '        and st.sizes["transformer"].class_name in MMDIT_CLASSES\n',
        "        and True\n",
        ("tests/test_checkpoints.py", "-k", "fp8_matmuls_it_does_not_have"),
    ),
    Mutation(
        "the plan sizes 2.1's VAE decode as Qwen-Image's",
        "qwennb/plan.py",
        "    per_mp = VAE_DECODE_GIB_PER_MP_BY_CLASS.get(vae_class, VAE_DECODE_GIB_PER_MP)",
        "    per_mp = VAE_DECODE_GIB_PER_MP",
        ("tests/test_checkpoints.py", "-k", "memory_measured_on_an_h200"),
    ),
    Mutation(
        "2.1 goes through Qwen-Image's block-by-block loader",
        "qwennb/pipeline.py",
        '    mmdit = plan_sizes(plan)["transformer"].class_name in MMDIT_CLASSES',
        "    mmdit = True",
        ("tests/test_checkpoints.py", "-k", "fp8_matmuls_it_does_not_have"),
    ),
    Mutation(
        "the toy/toy-edit switch report calls every component shared",
        "qwennb/edit.py",
        "            if COMPONENT_DIRS[comp] == TOY_MODEL_DIR:",
        "            if True:",
        ("tests/test_edit.py", "-k", "compare_models"),
    ),
    Mutation(
        "train_edit --layers grows with full copies of the neighbouring blocks (not identities)",
        "training/toy/train_edit.py",
        '                fresh = src == previous and name.startswith(("img_mod.", "txt_mod."))',
        "                fresh = False",
        ("tests/test_toy_edit.py", "-k", "growing"),
    ),
    Mutation(
        "train_edit --zero-cond-t leaves the flag off",
        "training/toy/train_edit.py",
        "    cfg.update(num_layers=layers, zero_cond_t=bool(zero_cond_t))",
        "    cfg.update(num_layers=layers)",
        ("tests/test_toy_edit.py", "-k", "growing"),
    ),
    Mutation(
        "plan_validation measures an edit model through a text-to-image generation",
        "benchmarks/plan_validation.py",
        '    return get_model(model).task == "image-edit"',
        "    return False",
        ("tests/test_plan_validation_smoke.py",),
    ),
    Mutation(
        "the plan counts 2.1's host RAM as if it were read block by block like Qwen-Image",
        "qwennb/plan.py",
        "    if t.class_name not in MMDIT_CLASSES:\n        # qwennb.loading reads only",
        "    if False:\n        # qwennb.loading reads only",
        ("tests/test_checkpoints.py", "-k", "host_ram_counts_the_whole"),
    ),
    Mutation(
        "the plan decides pinning on the load's host peak",
        "qwennb/plan.py",
        "            a = replace(a, pinned=cost(a, st).host_after_load_gb <= HOST_PIN_SHARE * st.host_gb)",
        "            a = replace(a, pinned=cost(a, st).host_peak_gb <= HOST_PIN_SHARE * st.host_gb)",
        ("tests/test_checkpoints.py", "-k", "host_ram_counts_the_whole"),
    ),
    Mutation(
        "the CLI holds SIGINT from any thread",
        CLI,
        "    if threading.current_thread() is not threading.main_thread():\n        return lambda: None\n",
        "",
        ("tests/test_batch.py", "-k", "off_the_main_thread"),
    ),
    Mutation(
        "2.1's packed Q/K/V weight read without checking each weight's place in the pack",
        "qwennb/speed21.py",
        "            or w.storage_offset() != offset + rows * first.shape[1]\n",
        "",
        ("tests/test_speed21.py", "-k", "packing_leaves or no_longer_packed"),
    ),
    Mutation(
        "2.1's packed MLP splits gate and up the wrong way round",
        "qwennb/speed21.py",
        "        up, gate = torch.nn.functional.linear(h, w_mlp).chunk(2, dim=-1)",
        "        gate, up = torch.nn.functional.linear(h, w_mlp).chunk(2, dim=-1)",
        ("tests/test_speed21.py", "-k", "packed_projections"),
    ),
    Mutation(
        "2.1's disable leaves the weights sharing one storage",
        "qwennb/speed21.py",
        "            lin.weight.data = lin.weight.detach().clone()",
        "            pass",
        ("tests/test_speed21.py", "-k", "packed_projections"),
    ),
    Mutation(
        "2.1 under CUDA graphs keeps the replay's output buffer",
        "qwennb/speed21.py",
        "        if graphs:\n            x = x.clone()",
        "        if False:\n            x = x.clone()",
        ("tests/test_speed21.py", "-k", "cuda_graph"),
    ),
    Mutation(
        "the plan hides 2.1's group-offload copies under compute",
        "qwennb/plan.py",
        "        stream_s = max(0.0, copies - STREAM_OVERLAP_BY_CLASS.get(t.class_name, STREAM_OVERLAP) * compute)",
        "        stream_s = max(0.0, copies - STREAM_OVERLAP * compute)",
        ("tests/test_plan_calibration.py", "-k", "2_1"),
    ),
    Mutation(
        "the synthetic edit stand-in draws its transformer whole, not in the stored form",
        "qwennb/pipeline.py",
        "            device=devices, dtype=dtype, config_dir=spec.config_dir, transformer=transformer\n        )\n    return",
        "            device=devices, dtype=dtype, config_dir=spec.config_dir\n        )\n    return",
        ("tests/test_loading.py", "-k", "stored_form"),
    ),
    # ---------------------------------------------------------------- FlashAttention-4 (session 10)
    Mutation(
        "FA4 leaves SDPA's cuDNN backend on (SDPA keeps choosing cuDNN)",
        "qwennb/attention.py",
        "    torch.backends.cuda.enable_cudnn_sdp(False)\n",
        "    pass\n",
        ("tests/test_attention.py", "-k", "enable_turns or keeps_cudnn"),
    ),
    Mutation(
        "FA4 does not tag the compile caches' key (cuDNN graphs come back from the cache)",
        "qwennb/attention.py",
        '    _state["cache_key_tag"] = _tag_cache_key(True)',
        '    _state["cache_key_tag"] = ""',
        ("tests/test_attention.py", "-k", "tag"),
    ),
    Mutation(
        "the FA4 adapter hands PyTorch flash-attn-4's whole result",
        "qwennb/_fa4_compat.py",
        "    return res[0], res[1]",
        "    return res",
        ("tests/test_attention.py", "-k", "adapter"),
    ),
    Mutation(
        "the plan turns FA4 on where flash-attn-4 is missing",
        "qwennb/plan.py",
        "    if missing and not (asked and described):",
        "    if False:",
        ("tests/test_attention.py", "-k", "cannot_run"),
    ),
    Mutation(
        "FA4 taken for any card from Hopper on (12.x included)",
        "qwennb/attention.py",
        "    return major in (9, 10)",
        "    return major >= 9",
        ("tests/test_attention.py", "-k", "capability or cannot_run"),
    ),
    # ---------------------------------------------------------------- toy edit phrasings, edit floor (session 11)
    Mutation(
        "the train+ phrasings are the train ones (no new sentence shapes)",
        "qwennb/toy.py",
        '_EN_EDIT["train+"] = {k: v + _EN_EDIT_MORE.get(k, []) for k, v in _EN_EDIT["train"].items()}',
        '_EN_EDIT["train+"] = {k: list(v) for k, v in _EN_EDIT["train"].items()}',
        ("tests/test_toy.py", "-k", "more_training"),
    ),
    Mutation(
        "an unknown phrasing split falls through to a KeyError",
        "qwennb/toy.py",
        "    if split not in _EN_EDIT:\n",
        "    if False:\n",
        ("tests/test_toy.py", "-k", "more_training"),
    ),
    Mutation(
        "train_edit --phrasings never reaches the examples",
        "training/toy/train_edit.py",
        "    split = split or PHRASINGS\n",
        '    split = split or "train"\n',
        ("tests/test_toy_edit.py", "-k", "phrasings"),
    ),
    Mutation(
        "the edit floor runs stock with the same SDPA kernel (a floor of nothing)",
        "benchmarks/edit.py",
        "run_stock(pipe, refs, size, steps, args.cfg, device, sdpa=kernel)",
        "run_stock(pipe, refs, size, steps, args.cfg, device)",
        ("tests/test_benchmark_smoke.py", "-k", "edit"),
    ),
    Mutation(
        "a model average takes the other model's share backwards",
        "training/toy/average_edit.py",
        "torch.lerp(a.float(), b.float().to(a.device), weight)",
        "torch.lerp(a.float(), b.float().to(a.device), 1 - weight)",
        ("tests/test_toy_edit.py", "-k", "average_edit"),
    ),
    Mutation(
        "a model average is evaluated unrounded, not as it ships in fp16",
        "training/toy/average_edit.py",
        ".to(store).to(a.dtype)",
        ".to(a.dtype)",
        ("tests/test_toy_edit.py", "-k", "average_edit"),
    ),
    Mutation(
        "a model average leaves the other model on the CPU beside a base on the GPU",
        "training/toy/average_edit.py",
        "b.float().to(a.device)",
        "b.float()",
        ("tests/test_toy_edit.py", "-k", "average_edit"),
    ),
    Mutation(
        "average_edit.py scores the evaluation's own draw as the validation draw",
        "training/toy/average_edit.py",
        "seed=args.val_seed, ",
        "",
        ("tests/test_toy_edit.py", "-k", "average_edit"),
    ),
    Mutation(
        "scrambled instructions always name the object first",
        "training/toy/train_edit.py",
        "    rng.shuffle(parts)\n",
        "",
        ("tests/test_toy_edit.py", "-k", "scrambled"),
    ),
    Mutation(
        "--scramble 0 still draws from the augmentation's stream (earlier runs no longer reproduce)",
        "training/toy/train_edit.py",
        'split != "heldout" and SCRAMBLE and aug.random()',
        'split != "heldout" and aug.random()',
        ("tests/test_toy_edit.py", "-k", "scrambled"),
    ),
    Mutation(
        "images of more than 8 bits go through PIL's clipping conversion (a 16-bit photo turns white)",
        "qwennb/edit.py",
        "        image = _wide_to_8bit(image, role)\n",
        "        pass\n",
        ("tests/test_edit.py", "-k", "bits"),
    ),
    Mutation(
        "CFG has no upper bound (1e308 overflows into a black image)",
        "qwennb/options.py",
        "or not 1 <= cfg <= MAX_CFG",
        "or cfg < 1",
        ("tests/test_magics.py", "-k", "bad_options"),
    ),
    Mutation(
        "an open quote in a cell magic's options is a traceback, not a usage error",
        "qwennb/magics.py",
        '    except ValueError as exc:\n        raise UsageError(f"{name}: cannot read',
        '    except KeyError as exc:\n        raise UsageError(f"{name}: cannot read',
        ("tests/test_magics.py", "-k", "bad_options"),
    ),
    Mutation(
        "per_item_edits.py ignores --seed (always the evaluation's draw)",
        "training/toy/per_item_edits.py",
        "seed=args.seed, ",
        "",
        ("tests/test_toy_edit.py", "-k", "per_item_edit_reader_draws"),
    ),
    Mutation(
        "qwennb edit's usage line back to argparse's (many instructions)",
        "qwennb/cli.py",
        '        usage="%(prog)s [options] IMAGE [IMAGE ...] INSTRUCTION",\n',
        "",
        ("tests/test_edit.py", "-k", "usage"),
    ),
    Mutation(
        "the pipeline's users do not wait for a load running in the background",
        "qwennb/session.py",
        "        self.wait()\n        return self._pipe\n",
        "        return self._pipe\n",
        ("tests/test_background_load.py",),
    ),
    Mutation(
        "a failed background load is swallowed (the command runs on with no model, or loads silently)",
        "qwennb/magics.py",
        '            raise UsageError(f"the model could not be loaded: {why} (%qwen load MODEL tries again)") from None',
        "            return",
        ("tests/test_magics.py", "-k", "failed_background"),
    ),
    Mutation(
        "%load_ext loads in the kernel's thread again (6-8 s)",
        "qwennb/magics.py",
        "            magics.load(background=magics.background_load)",
        "            magics.load()",
        ("tests/test_magics.py", "-k", "returns_while or fresh_process or quick"),
    ),
    Mutation(
        "a background load prints diffusers' loading bars into whichever cell runs",
        "qwennb/session.py",
        "                with _quiet_loading():\n",
        "                with contextlib.nullcontext():\n",
        ("tests/test_magics.py", "-k", "returns_while"),
    ),
    Mutation(
        "Ctrl-C while waiting forgets the load that goes on (a second load starts)",
        "qwennb/session.py",
        "            if future.done():\n                self._loading = None",
        "            self._loading = None",
        ("tests/test_magics.py", "-k", "ctrl_c_while_waiting"),
    ),
    Mutation(
        "a load after a failed background load raises that old error instead of loading",
        "qwennb/session.py",
        "        self._settle()\n        return self._build(",
        "        self.wait()\n        return self._build(",
        ("tests/test_background_load.py",),
    ),
    Mutation(
        "reworded instructions keep the phrasing's own verbs",
        "training/toy/train_edit.py",
        'lambda m: m.group(0) if m.group(0).lower() in keep_en else unknown_word(rng, "en")',
        "lambda m: m.group(0)",
        ("tests/test_toy_edit.py", "-k", "reword"),
    ),
    Mutation(
        "--reword-background never rewords the background noun",
        "training/toy/train_edit.py",
        '        keep_en, keep_zh = _KEEP_EN - {"background"}, _KEEP_ZH - set("背景")\n',
        "        pass\n",
        ("tests/test_toy_edit.py", "-k", "reword_background"),
    ),
]


def _copy_repo(dest: Path) -> None:
    for name in ("qwennb", "tests", "training"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copy2(ROOT / "README.md", dest / "README.md")  # the card table test compares it with scripts/
    shutil.copytree(ROOT / "scripts", dest / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "benchmarks", dest / "benchmarks")  # the recorded GPU results some tests read
    (dest / "notebooks").mkdir()
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy2(nb, dest / "notebooks" / nb.name)
    shutil.copy2(ROOT / "notebooks" / "sanitize.cfg", dest / "notebooks" / "sanitize.cfg")


def _run_tests(work: Path, args: tuple[str, ...], timeout: float) -> tuple[str, float]:
    existing = [
        a for a in args if not a.startswith(("tests/", "notebooks/")) or (work / a.split("::")[0]).exists()
    ]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-o", "addopts=", "-p", "no:cacheprovider", *existing]
    env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    if proc.returncode == 0:
        return "survived", elapsed
    if proc.returncode == 5:  # no tests collected: the selection is wrong, not the code
        return "no tests", elapsed
    if (
        proc.returncode != 1
    ):  # 2-4: interrupted, internal or usage error (e.g. the mutated module does not import)
        return "error", elapsed
    return "caught", elapsed


def run(mutations: list[Mutation], timeout: float, baseline: bool) -> list[tuple[Mutation, str, float]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="qwennb-mutation-") as tmp:
        work = Path(tmp)
        _copy_repo(work)
        if baseline:  # the selected tests must pass on the unmutated code, or "caught" means nothing
            for args in sorted({m.tests for m in mutations}):
                outcome, _ = _run_tests(work, args, timeout)
                if outcome != "survived":
                    print(f"baseline: {' '.join(args)} -> {outcome}; fix the tests first", flush=True)
                    sys.exit(1)
        for m in mutations:
            path = work / m.module
            source = path.read_text()
            if source.count(m.old) != 1:
                results.append((m, "stale", 0.0))
                print(
                    f"stale     {m.module}: {m.name} (snippet found {source.count(m.old)} times)", flush=True
                )
                continue
            path.write_text(source.replace(m.old, m.new))
            try:
                outcome, elapsed = _run_tests(work, m.tests, timeout)
            finally:
                path.write_text(source)
            results.append((m, outcome, elapsed))
            print(f"{outcome:<9} {m.module}: {m.name} ({elapsed:.0f} s)", flush=True)
    return results


def report(results: list[tuple[Mutation, str, float]]) -> str:
    scored = [r for r in results if r[1] in ("caught", "survived", "timeout")]
    caught = sum(r[1] in ("caught", "timeout") for r in scored)
    lines = [
        f"Score: **{caught}/{len(scored)} caught** ({100 * caught / max(1, len(scored)):.0f}%)"
        + (f"; {len(results) - len(scored)} stale or without tests" if len(results) > len(scored) else ""),
        "",
        "| module | mutation | outcome | tests run | s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m, outcome, elapsed in results:
        lines.append(
            f"| {m.module.split('/')[-1]} | {m.name} | {outcome} | `{' '.join(m.tests)}` | {elapsed:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only",
        help="mutate only modules whose path contains this (generation, speed, plan, presets, batch, cli, magics)",
    )
    ap.add_argument(
        "--name", help="run only the mutations whose name contains one of these (comma-separated)"
    )
    ap.add_argument("--timeout", type=float, default=300, help="seconds per test run (default 300)")
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip running the selected tests unmutated first"
    )
    ap.add_argument("--write", help="write the result table into this markdown file (between markers)")
    args = ap.parse_args(argv)
    chosen = [
        m
        for m in MUTATIONS
        if (not args.only or args.only in m.module)
        and (not args.name or any(n.strip() in m.name for n in args.name.split(",")))
    ]
    t0 = time.perf_counter()
    results = run(chosen, args.timeout, baseline=not args.no_baseline)
    table = report(results)
    print(f"\n{table}\n\n({time.perf_counter() - t0:.0f} s in all)")
    if args.write:
        path = Path(args.write)
        start, end = "<!-- mutation-check:start -->", "<!-- mutation-check:end -->"
        text = path.read_text() if path.exists() else f"{start}\n{end}\n"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        path.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    survived = sum(r[1] == "survived" for r in results)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
