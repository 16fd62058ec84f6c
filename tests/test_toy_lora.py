"""A trained LoRA on the trained toy model, in every key layout qwennb reads: meaning, not only drift (#17).

``tests/fixtures/toy_lora/purple_*.safetensors`` hold one rank-4 LoRA, trained by ``training/toy/train_lora.py``
on ``qwennb/toy_model``, that draws every shape purple whatever colour the prompt names, written in six key
layouts (diffusers' two, PEFT's, kohya, ComfyUI, the Lightning releases'). Loaded the way a user loads one
(``Session().load("toy")``, ``Session.lora_add`` / ``lora_scale`` / ``lora_remove``, ``generate(..., loras=...)``),
each must paint the shapes purple at scale 1 (read back by ``qwennb.toy.read_image``), give the pixels of no
LoRA at scale 0, and give them back exactly once removed. ``training/toy/LORA.md`` has the measurements the
thresholds come from. When the toy model is retrained the fixtures no longer fit it: every test then says so
and names the command that retrains them.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwennb import toy
from qwennb.models import TOY_MODEL_DIR
from qwennb.session import Session

FIXTURES = Path(__file__).parent / "fixtures" / "toy_lora"
META = json.loads((FIXTURES / "purple.json").read_text())
LAYOUTS = list(META["files"])
RETRAIN = "python training/toy/train_lora.py"
# The settings train_lora.py measures as the tests' (LORA.md): small and few steps, so that the file runs in
# about a minute; the toy keeps the prompt's colour, background and place there.
OPTS = dict(width=128, height=128, steps=8, cfg=4.0)
# Four prompts in the training phrasings naming red, blue, orange and green (English and Chinese), with their
# seeds: every third of the twelve LORA.md measures the tests' settings on.
ITEMS = [i for i in toy.eval_set(24, seed=4321, split="train") if i.expected["colour"] != "purple"][:12:3]
# Measured at these settings on 12 prompts: 12 of 12 purple with the LoRA in every layout, 0 without.
MIN_PURPLE = 3  # of the 4


def base_sha256() -> str:
    return hashlib.sha256(
        (Path(TOY_MODEL_DIR) / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    ).hexdigest()


@pytest.fixture(scope="module")
def same_base() -> str:
    """The toy transformer's sha256, failing every test that uses it (with what to run) when the fixtures were
    trained on another toy model: their colours would then fail for no visible reason."""
    now, then = base_sha256(), META["base_transformer_sha256"]
    if now != then:
        pytest.fail(
            f"the toy model changed since the LoRA fixtures were trained (its transformer's sha256 is {now[:12]}…, "
            f"they were trained on {then[:12]}…): rerun `{RETRAIN}` and commit tests/fixtures/toy_lora and "
            "training/toy/LORA.md",
            pytrace=False,
        )
    return now


@pytest.fixture(scope="module")
def session(same_base):
    # One thread: on a shared two-core machine two OpenMP threads ran the toy's small matmuls nine times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = Session()
    s.load("toy")
    yield s
    s.unload()
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_lora_left(request):
    yield
    if "session" in request.fixturenames:
        s = request.getfixturevalue("session")
        if s.lora_list():
            s.lora_remove()


def path_of(layout: str) -> str:
    return str(FIXTURES / META["files"][layout]["file"])


def image(session, item, **kw) -> np.ndarray:
    result = session.generate(item.prompt, seed=item.seed, **OPTS, **kw)
    return np.asarray(result.images[0])


def colours(images) -> list:
    return [toy.read_image(x).colour for x in images]


@pytest.fixture(scope="module")
def plain(session) -> list:
    return [image(session, i) for i in ITEMS]


def test_the_fixtures_were_trained_on_this_toy_model(same_base):
    from safetensors import safe_open

    total = (FIXTURES / "purple.json").stat().st_size
    for layout, f in META["files"].items():
        path = FIXTURES / f["file"]
        total += path.stat().st_size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"], (
            f"{path.name} is not the file purple.json records: rerun `{RETRAIN}`"
        )
        with safe_open(str(path), "pt") as s:
            meta = s.metadata()
        assert meta["qwennb.base_transformer_sha256"] == same_base
        assert meta["qwennb.layout"] == layout
    assert total < 2_000_000


def test_without_the_lora_the_shapes_have_the_prompted_colours(plain):
    got = colours(plain)
    assert "purple" not in got
    assert sum(c == i.expected["colour"] for c, i in zip(got, ITEMS, strict=True)) >= MIN_PURPLE, got


SCALE_1: dict[str, list] = {}  # the first layout's images at scale 1, to compare the others with


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_paints_purple_at_1_changes_nothing_at_0_and_comes_off(session, plain, layout):
    info = session.lora_add(path_of(layout), 1.0)
    assert (info.format, info.rank, info.modules) == (META["files"][layout]["format"], 4, 48)
    on = [image(session, i) for i in ITEMS]
    got = colours(on)
    assert sum(c == "purple" for c in got) >= MIN_PURPLE, (
        f"{layout} at scale 1 drew {got} for prompts naming {[i.expected['colour'] for i in ITEMS]}"
    )
    # The same weights in other keys (alpha kept apart, folded in, or in the file's metadata) are the same LoRA.
    first = SCALE_1.setdefault("images", on)
    assert all(np.array_equal(a, b) for a, b in zip(on, first, strict=True))
    session.lora_scale(info.name, 0.0)
    assert np.array_equal(image(session, ITEMS[0]), plain[0])
    session.lora_remove(info.name)
    assert session.lora_list() == []
    assert np.array_equal(image(session, ITEMS[0]), plain[0])


def test_the_loras_argument_puts_it_on_and_an_empty_list_takes_it_off(session, plain):
    item = ITEMS[1]
    with_it = session.generate(
        item.prompt, seed=item.seed, loras=[{"source": path_of("kohya"), "scale": 1}], **OPTS
    )
    assert toy.read_image(with_it.images[0]).colour == "purple"
    assert [(r["name"], r["scale"], r["sha256"]) for r in with_it.loras] == [
        ("purple_kohya", 1.0, META["files"]["kohya"]["sha256"])
    ]
    without = session.generate(item.prompt, seed=item.seed, loras=[], **OPTS)
    assert without.loras == [] and session.lora_list() == []
    assert np.array_equal(np.asarray(without.images[0]), plain[1])


# --------------------------------------------------------------------------- the few-step LoRA
# tests/fixtures/toy_lora/fewstep4.safetensors: distilled by training/toy/train_fewstep_lora.py from the toy's own
# 20-step, CFG-4 runs into 4 unguided steps (as the Lightning LoRAs are). Measured (48 held-out items, 256x256):
# all four attributes right in 0.917 of them at 20 steps CFG 4, 0.917 at 4 steps CFG 1 with the LoRA, 0.896 without;
# mean pixel distance from the 20-step picture of the same seed 2.55 with, 2.83 without (on the 12 here: 2.46 and
# 2.24). The flat toy world is nearly drawable in 4 steps already, so the LoRA's gain is small; it is the few-step
# path that is tested here: a distilled LoRA in 4 unguided steps keeps the 20-step adherence.
FEWSTEP = FIXTURES / "fewstep4.safetensors"
FEW_ITEMS = toy.eval_set(12, split="heldout", seed=5)


def test_the_few_step_lora_keeps_adherence_in_4_unguided_steps(session):
    from safetensors import safe_open

    with safe_open(str(FEWSTEP), "pt") as f:
        assert f.metadata()["qwennb.base_transformer_sha256"] == base_sha256(), (
            "the toy changed since fewstep4 was trained: rerun python training/toy/train_fewstep_lora.py"
        )

    def run(steps, cfg, **kw):
        return [
            session.generate(i.prompt, seed=i.seed, steps=steps, cfg=cfg, width=256, height=256, **kw).images[
                0
            ]
            for i in FEW_ITEMS
        ]

    ref = run(20, 4.0)
    without = run(4, 1.0)
    session.lora_add(str(FEWSTEP))
    with_lora = run(4, 1.0)
    session.lora_remove()
    again = run(4, 1.0)
    scores = {name: toy.score(FEW_ITEMS, imgs)["all"] for name, imgs in (("20", ref), ("4+lora", with_lora))}
    print(scores)
    for attribute in ("colour", "shape", "position", "background"):
        assert scores["4+lora"][attribute] >= scores["20"][attribute] - 0.09, (
            attribute,
            scores,
        )  # one item of 12
    # The LoRA is on (the pictures change) but does not reliably bring them nearer the 20-step ones: 2.46 with
    # against 2.24 without on these 12 items, 2.55 against 2.83 on 48.
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(with_lora, without, strict=True)
    )
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, without, strict=True)
    )  # removed: as before


# --------------------------------------------------------------------------- fused block by block (fp8 plans on GPUs)


def _weights(transformer) -> dict:
    return {k: v.detach().float().clone() for k, v in transformer.state_dict().items()}


def test_loras_fused_block_by_block_at_load_equal_diffusers_fused_weights(same_base, tmp_path):
    """An fp8 plan on a GPU loads the transformer block by block straight into fp8 (qwennb.loading), so its LoRAs
    are fused into each block before it is quantised: the weights must be those diffusers' own loading and fusing
    gives (``fuse_before_quantising``), for every key layout, for two LoRAs at once at their scales, and for layers
    outside the blocks. (The GPU side, fp8 and meaning: tests/test_gpu.py.)"""
    from safetensors.torch import save_file

    from qwennb import lora
    from qwennb.loading import load_transformer
    from qwennb.pipeline import _lora_reader, build
    from qwennb.plan import describe_machine, make_plan

    pipe = build(make_plan(describe_machine(host_ram_gb=16), "toy"))
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    extra = {}  # a diffusers-layout LoRA on two layers outside the blocks too
    for name in ("img_in", "proj_out", "transformer_blocks.1.attn.to_q"):
        layer = t.get_submodule(name)
        extra[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g) * 0.1
        extra[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g) * 0.1
    save_file(extra, str(tmp_path / "outside.safetensors"))
    cases = [[(path_of(layout), 0.8)] for layout in LAYOUTS]
    cases.append([(path_of("kohya"), 0.5), (str(tmp_path / "outside.safetensors"), -1.5)])
    for specs in cases:
        want_pipe = build(make_plan(describe_machine(host_ram_gb=16), "toy"))
        lora.fuse_before_quantising(want_pipe, specs)
        want = _weights(want_pipe.transformer)
        # the reader the GPU's fp8 load gets from build() (qwennb.pipeline._load_pretrained)
        got_t = load_transformer(TOY_MODEL_DIR, torch.float32, fp8=False, read_loras=_lora_reader(specs))
        got = _weights(got_t)
        assert set(got) == set(want)
        worst = max(float((got[k] - want[k]).abs().max() / (want[k].abs().max() + 1e-12)) for k in want)
        assert worst < 1e-5, (specs, worst)
        changed = [k for k in want if not torch.equal(want[k], _weights(t)[k])]
        assert changed, specs  # the LoRA changed weights (and the load put the same changes in)
        infos = got_t._qwennb_fused_loras
        assert [(i.source, i.scale, i.fused) for i in infos] == [(s, float(c), True) for s, c in specs]
        assert infos[0].sha256 == hashlib.sha256(Path(specs[0][0]).read_bytes()).hexdigest()
