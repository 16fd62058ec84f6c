"""The embedded toy edit model (``toy-edit``) through ``qwennb.edit``: tests of meaning, not of pixels.

``toy-edit`` is QwenImageEditPlusPipeline over the toy model's VAE and text encoder with a transformer fine-tuned
on the toy world's edits (``training/toy/train_edit.py``). Each result is read back with ``toy.read_image`` and
judged by ``toy.score_edits``: the asked-for attribute changed, every other one as before. Thresholds come from
measurements on the CPU (20 steps, the model's default CFG 1; the numbers are in the comments) with a margin. Not
asserted, because the model (training/toy/EDIT.md: CPU runs, then runs on an H200) does not do it reliably: keeping
the shape and its colour while moving or resizing it, and the edit issue's 90% target.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from qwennb import toy
from qwennb.cli import main
from qwennb.edit import edit, load_edit_pipeline
from qwennb.generation import generate
from qwennb.pipeline import build
from qwennb.plan import describe_machine, make_plan

STEPS = 10  # toy-edit's default (as good as 20 or 40 steps: EDIT.md, session 10)
SIZE = ((128, 128),)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_toy_model: two threads on two busy cores wait on each other
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return load_edit_pipeline("toy-edit", describe_machine(host_ram_gb=8))


def run(pipe, items, cfg=None):
    """Each item edited; ``cfg`` None: the model's default (CFG 1 for toy-edit)."""
    out = []
    for it in items:
        src = toy.render(it.source, it.width, it.height)
        r = edit(pipe, [src], it.instruction, seed=it.seed, steps=STEPS, cfg=cfg)
        assert r.images[0].size == (it.width, it.height) and r.model == "toy-edit"
        assert r.cfg == (1.0 if cfg is None else cfg)
        out.append(r.images[0])
    return out


@pytest.fixture(scope="module")
def train_words(pipe):
    items = toy.edit_eval_set(20, seed=11, sizes=SIZE, split="train")
    return items, run(pipe, items)


def test_carries_out_edits_in_training_phrasings(train_words):
    items, images = train_words
    s = toy.score_edits(items, images)
    # CPU, 20 items at 128x128 (4 of each kind, half English, half Chinese), measured (edit-run7, CFG 1): changed
    # 1.00, kept 0.65; position and background edits 4/4 each (edit-run5 at CFG 4: changed 0.75).
    assert s["all"]["changed"] >= 0.8, s
    assert s["position"]["changed"] >= 0.75 and s["background"]["changed"] >= 0.75, s


def test_keeps_place_and_background_it_was_not_asked_to_change(train_words):
    items, images = train_words
    for attr in ("position", "background"):
        others = [(it, im) for it, im in zip(items, images, strict=True) if it.kind != attr]
        kept = sum(toy.read_image(im).attributes()[attr] == getattr(it.target, attr) for it, im in others)
        # measured (edit-run7, CFG 1): 16/16 each
        assert kept / len(others) >= 0.75, (attr, kept, len(others))


@pytest.fixture(scope="module")
def held_out(pipe):
    items = toy.edit_eval_set(20, seed=12, sizes=SIZE, split="heldout")
    return items, run(pipe, items)


def test_other_words_for_the_same_edits(held_out):
    """Phrasings the model never saw in training (English and Chinese)."""
    s = toy.score_edits(*held_out)
    # measured (edit-run9, its default CFG 1 and 10 steps): changed 0.95, kept 0.80, right 0.75 (CFG 4: 0.75 / 0.05 /
    # 0.05); edit-run7 in 20 steps: 0.95 / 0.70 / 0.65
    assert s["all"]["changed"] >= 0.75 and s["all"]["kept"] >= 0.5, s


def test_the_default_no_cfg_edits_better_than_cfg_4(pipe, held_out):
    """The toy edit model's default is CFG 1: true CFG against the empty instruction (whose training target was the
    unchanged source) pushes away from the source and loses what should be kept (120 held-out edits at 128x128:
    kept 0.64 at CFG 1 against 0.14 at CFG 4, right 0.55 against 0.10)."""
    plan = make_plan(describe_machine(host_ram_gb=8), "toy-edit")
    assert plan.defaults["cfg"] == 1.0 and plan.defaults["steps"] == 10
    from qwennb.edit import plan_edit

    hw = describe_machine(host_ram_gb=8)
    assert plan_edit(hw, "toy-edit").defaults["cfg"] == 1.0
    asked = plan_edit(hw, "toy-edit", {"optimal_cfg_scale": 3.0, "optimal_steps": 7}).defaults
    assert (asked["cfg"], asked["steps"]) == (3.0, 7)  # what the user sets wins
    items, images = held_out
    default = toy.score_edits(items, images)["all"]
    cfg4 = toy.score_edits(items, run(pipe, items, cfg=4.0))["all"]
    # measured on these 20 (edit-run9, 10 steps): kept 0.80 against 0.05, right 0.75 against 0.05, mae_rest 1.6
    # against 5.5
    assert default["kept"] >= cfg4["kept"] + 0.2, (default, cfg4)
    assert default["right"] >= cfg4["right"] + 0.15, (default, cfg4)
    assert default["mae_rest"] < cfg4["mae_rest"], (default, cfg4)


def test_the_instruction_not_the_seed_decides_where_the_shape_goes(pipe):
    scene = toy.Scene("square", "green", "center", "large", "white")
    src = toy.render(scene, 128, 128)
    places = {
        p: toy.read_image(edit(pipe, [src], f"move the square to the {p}", seed=seed, steps=STEPS).images[0])
        for seed, p in enumerate(("left", "right", "top", "bottom"))
    }
    assert {p: r.position for p, r in places.items()} == {p: p for p in places}, places
    assert {r.background for r in places.values()} == {"white"}, places


def test_cli_edit_on_the_embedded_model(tmp_path, capsys):
    path = tmp_path / "in.png"
    toy.render(toy.Scene("square", "orange", "left", "large", "white"), 128, 128).save(path)
    argv = [
        "edit",
        str(path),
        "move the square to the right",
        "--seed",
        "2",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "toy-edit"  # no real edit weights here: the embedded edit model, with a notice
    got = toy.read_image(Image.open(d["images"][0]))
    assert (got.position, got.background) == ("right", "white"), got


@pytest.fixture(scope="module")
def toy_pipe():
    return build(make_plan(describe_machine(host_ram_gb=8), "toy"))


@pytest.mark.parametrize(
    "start, prompt, wanted",
    [
        (
            ("square", "blue", "left", "large", "white"),
            "a red circle on the right, white background",
            ("red", "circle", "right"),
        ),
        (
            ("triangle", "green", "top", "large", "black"),
            "a purple star at the bottom, black background",
            ("purple", "star", "bottom"),
        ),
        (
            ("circle", "orange", "right", "large", "beige"),
            "一个蓝色的正方形在左边，白色背景",
            ("blue", "square", "left"),
        ),
    ],
)
def test_img2img_on_the_toy_model_keeps_the_layout_at_low_strength(toy_pipe, start, prompt, wanted):
    """The edit issue's img2img target on the toy text-to-image model: strength 0.3 keeps the input's shape and
    place (the colour may follow the prompt), 1.0 draws what the prompt says."""
    scene = toy.Scene(*start)
    init = toy.render(scene)
    low = toy.read_image(
        generate(toy_pipe, prompt, init_image=init, strength=0.3, steps=STEPS, seed=4).images[0]
    )
    full = toy.read_image(
        generate(toy_pipe, prompt, init_image=init, strength=1.0, steps=STEPS, seed=4).images[0]
    )
    assert (low.shape, low.position, low.background) == (scene.shape, scene.position, scene.background), low
    assert (full.colour, full.shape, full.position) == wanted, full


def test_the_training_script_runs_and_encodes_as_the_pipeline_does(tmp_path):
    """training/toy/train_edit.py's pieces on a handful of examples: the batched text encoding equals the
    pipeline's own, the pool holds what the transformer needs, and a few steps of training run."""
    import random
    import sys
    from pathlib import Path

    import torch

    # imported by name (not from a file spec), so that the pool's spawned workers can import it too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    device = torch.device("cpu")
    init = Path(te.ROOT / "qwennb/toy_model/transformer")
    pipe = te.build(init, device)
    assert te.check_batch(pipe, device)
    pool = te.build_pool(pipe, random.Random(0), 10, device)
    # two worker processes doing the CPU part give the same pool
    same = te.build_pool(pipe, random.Random(0), 10, device, workers=2, init=init)
    for res in pool:
        for key in ("src", "tgt", "fg", "emb", "mask"):
            assert torch.equal(pool[res][key], same[res][key]), (res, key)
    p = pool[128]
    assert p["src"].shape[1:] == (16, 16, 16) and p["emb"].shape[0] == p["mask"].shape[0] == p["src"].shape[0]
    history: list = []
    steps = te.train(pipe, pool, device, 3.0, 2, history, 4.0, 3e-4, high_sigma=0.5)
    assert steps >= 1 and all(h["loss"] == h["loss"] for h in history)  # finite, not NaN


def test_a_missing_edit_transformer_is_one_clear_error(tmp_path):
    from qwennb.errors import LoadError
    from qwennb.toy_edit import assemble_toy_edit

    with pytest.raises(LoadError, match="transformer is missing .*reinstall qwennb"):
        assemble_toy_edit(init_transformer=tmp_path)


def test_the_edit_model_uses_the_text_encoder_it_was_trained_against(tmp_path):
    # Shipped now: an edit transformer trained against the toy's own text encoder (toy run 8), so toy-edit loads
    # that one; another text encoder folder (one an older edit model was trained against) is taken when given.
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from qwennb.errors import LoadError
    from qwennb.models import TOY_MODEL_DIR
    from qwennb.toy_edit import COMPONENT_DIRS, assemble_toy_edit

    assert COMPONENT_DIRS["text_encoder"] == TOY_MODEL_DIR
    toys = load_file(f"{TOY_MODEL_DIR}/text_encoder/model.safetensors")
    name = next(k for k in toys if k.endswith("embed_tokens.weight"))

    def embedding(pipe):
        return next(v for k, v in pipe.text_encoder.state_dict().items() if k.endswith("embed_tokens.weight"))

    assert torch.equal(embedding(assemble_toy_edit()), toys[name].float())
    other = tmp_path / "te"
    shutil.copytree(f"{TOY_MODEL_DIR}/text_encoder", other)
    changed = {k: (v + 1 if k == name else v) for k, v in toys.items()}
    save_file(changed, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(embedding(assemble_toy_edit(text_encoder=other)), changed[name].float())
    with pytest.raises(LoadError, match="text encoder is missing"):
        assemble_toy_edit(text_encoder=tmp_path / "nothing")


def test_training_instructions_are_augmented_without_held_out_words(monkeypatch):
    """train_edit.py gives a share of its training instructions words that say nothing (as train.py does for
    captions); the instruction's own words stay, and no word of the held-out phrasings slips in."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    monkeypatch.setattr(te, "AUGMENT", 0.0)
    plain = te.make_examples(random.Random(3), 200)
    monkeypatch.setattr(te, "AUGMENT", 1.0)
    noisy = te.make_examples(random.Random(3), 200)
    changed = 0
    for (s1, t1, a), (s2, t2, b) in zip(plain, noisy, strict=True):
        assert (s1, t1) == (s2, t2)
        if a == b:
            continue
        changed += 1
        if all(ord(c) < 128 for c in a):
            added = b.split()
            for w in a.split():
                added.remove(w)  # every word of the instruction is still there
            assert added and not set(added) & te._EN_HELD, (a, b)
        else:
            assert len(b) > len(a) and not any(h in b for h in te._ZH_HELD if h not in a), (a, b)
    assert changed >= 150  # all but the empty instructions (10%) and the rare draw that changes nothing


def test_ship_writes_a_text_encoder_only_for_a_model_trained_against_another(tmp_path, monkeypatch):
    """train_edit.py --ship: the transformer always; the text encoder only when it is not the toy's own (then a
    copy shipped before goes, so that toy-edit shares the toy's)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    from qwennb import toy_edit
    from qwennb.models import TOY_MODEL_DIR

    dest = tmp_path / "toy_edit_model"
    monkeypatch.setattr(toy_edit, "TOY_EDIT_DIR", str(dest))
    pipe = toy_edit.assemble_toy_edit()
    other = tmp_path / "other_te"
    pipe.text_encoder.save_pretrained(other)
    te.ship(pipe, str(other))
    assert (dest / "transformer" / "config.json").is_file() and (
        dest / "text_encoder" / "config.json"
    ).is_file()
    te.ship(pipe, f"{TOY_MODEL_DIR}/text_encoder")
    assert (dest / "transformer" / "config.json").is_file() and not (dest / "text_encoder").exists()


def test_growing_the_edit_transformer_starts_from_what_it_computed():
    """train_edit.py --layers: the new blocks start as identities (zeroed modulation), so the grown transformer
    gives the old one's output; --zero-cond-t then changes how the reference's tokens are modulated (2511's way)."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    from qwennb import toy_edit

    old = toy_edit.assemble_toy_edit().transformer.float().eval()
    n, c, hh, ww = 1, 16, 8, 8
    g = torch.Generator().manual_seed(0)
    xt, src = torch.randn(n, c, hh, ww, generator=g), torch.randn(n, c, hh, ww, generator=g)
    emb = torch.randn(n, 5, old.config.joint_attention_dim, generator=g)
    mask = torch.ones(n, 5, dtype=torch.long)
    sig = torch.tensor([0.7])
    own = bool(old.config.zero_cond_t)  # the shipped model's (2511's way since edit-run7)
    with torch.no_grad():
        want = te.velocity(old, xt, src, emb, mask, sig)
        grown = te.grow(old, 10, own).eval()
        got = te.velocity(grown, xt, src, emb, mask, sig)
        flipped = te.grow(old, 6, not own).eval()
        other = te.velocity(flipped, xt, src, emb, mask, sig)
    assert grown.config.num_layers == 10 and len(grown.transformer_blocks) == 10
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # zero_cond_t on or off: the reference's tokens modulated at t=0 or at t, another function, the same weights
    assert flipped.config.zero_cond_t is (not own) and (other - want).abs().max() > 1e-3
    assert te.grow(old, 0, own) is old
    with pytest.raises(SystemExit, match="growing only adds"):
        te.grow(old, 4, own)


def test_results_give_the_command_that_reruns_the_training():
    """RESULTS.md's command line keeps options set to zero (--augment 0 is not the default 0.3) and writes flags
    bare (--zero-cond-t, not '--zero-cond-t True')."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train

    args = argparse.Namespace(augment=0.0, layers=0, zero_cond_t=True, ship=False, init=None, eval_n=120)
    cmd = train.command_line("train_edit.py", args)
    assert cmd == "python training/toy/train_edit.py --augment 0.0 --layers 0 --zero-cond-t --eval-n 120", cmd


def test_kind_weights_and_the_empty_share_shape_the_training_examples(monkeypatch):
    """train_edit.py --kind-weights colour=3,shape=3 draws more of the kinds the model gets wrong most (recolour and
    reshape: EDIT.md, session 10); --empty 0 leaves out the examples without an instruction. Unweighted, the
    examples are the ones drawn before the option existed (same stream)."""
    import random
    import sys
    from collections import Counter
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    from qwennb import toy

    def kinds(examples) -> Counter:
        return Counter(
            next(k for k in toy.EDIT_KINDS if getattr(s, k) != getattr(t, k))
            for s, t, text in examples
            if text.strip() and s != t
        )

    monkeypatch.setattr(te, "AUGMENT", 0.0)
    monkeypatch.setattr(te, "KIND_WEIGHTS", {})
    even = kinds(te.make_examples(random.Random(5), 600))
    assert 0.3 < (even["colour"] + even["shape"]) / sum(even.values()) < 0.5
    monkeypatch.setattr(te, "KIND_WEIGHTS", te.parse_kind_weights("colour=3,shape=3"))
    weighted = kinds(te.make_examples(random.Random(5), 600))
    assert (weighted["colour"] + weighted["shape"]) / sum(weighted.values()) > 0.6
    monkeypatch.setattr(te, "EMPTY", 0.0)
    assert all(text.strip() for _, _, text in te.make_examples(random.Random(5), 200))
    for bad in ("color=2", "shape=two", "shape=-1", "colour=0,shape=0,position=0,size=0,background=0"):
        with pytest.raises(SystemExit, match="--kind-weights"):
            te.parse_kind_weights(bad)
    import subprocess

    script = Path(__file__).resolve().parents[1] / "training" / "toy" / "train_edit.py"
    for option, message in (
        ("--empty", "--empty 1.5: a share from 0"),
        ("--scramble", "--scramble 1.5: a share"),
        ("--reword", "--reword 1.5: a share"),
        ("--reword-background", "--reword-background 1.5: a share"),
    ):
        proc = subprocess.run(
            [sys.executable, str(script), option, "1.5"], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode != 0 and message in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(script), "--scramble", "0.6", "--reword", "0.6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "shares of one draw, 1 at most together" in proc.stderr


def test_phrasings_train_plus_adds_sentence_shapes_to_the_training_examples(monkeypatch, fits_phrasing):
    """--phrasings train+ draws instructions from the training phrasings and more sentence shapes (the new value before
    the object: "use a star instead of the circle"); the default stays the phrasings every shipped model saw."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    more = [t for table in (toy._EN_EDIT_MORE, toy._ZH_EDIT_MORE) for ts in table.values() for t in ts]
    fits = [fits_phrasing(t) for t in more]

    def new_shapes(examples) -> int:
        return sum(any(f.fullmatch(text) for f in fits) for _, _, text in examples)

    monkeypatch.setattr(te, "AUGMENT", 0.0)
    assert te.PHRASINGS == "train" and new_shapes(te.make_examples(random.Random(6), 600)) == 0
    monkeypatch.setattr(te, "PHRASINGS", "train+")
    assert new_shapes(te.make_examples(random.Random(6), 600)) > 30


def _edits_beside(plain, changed):
    """(source, target, changed text, kind, new value) for each edit of two example lists drawn from one seed
    (the scenes must be the same; an empty instruction stays empty in both)."""
    for (s1, t1, a), (s2, t2, b) in zip(plain, changed, strict=True):
        assert (s1, t1) == (s2, t2)
        if s1 == t1:
            assert b == a == " "
            continue
        kind = next(k for k in toy.EDIT_KINDS if getattr(s1, k) != getattr(t1, k))
        yield s1, t1, b, kind, getattr(t1, kind)


def test_scrambled_instructions_name_object_and_new_value_in_either_order_among_unknown_words(monkeypatch):
    """train_edit.py --scramble: a share of training instructions is the object and the new value, in either order,
    among words the toy world never says (so only the source image tells which named value is new); the scenes stay
    the same, no held-out word slips in, and at 0 the examples are exactly those earlier runs trained on."""
    import hashlib
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    # at --scramble 0 the augmentation's random stream is untouched: earlier runs' examples, byte for byte
    assert te.SCRAMBLE == 0
    digest = hashlib.sha256(repr(te.make_examples(random.Random(3), 300)).encode()).hexdigest()[:16]
    assert digest == "cf24fb6f60abd6cd"
    monkeypatch.setattr(te, "AUGMENT", 0.0)
    plain = te.make_examples(random.Random(8), 400)
    monkeypatch.setattr(te, "SCRAMBLE", 1.0)
    scrambled = te.make_examples(random.Random(8), 400)
    orders = {"new first": 0, "object first": 0}
    allowed = {"a", "the", "it", "shape", "background"}
    for table in (toy._EN["colour"], toy._EN["shape"], toy._EN["background"], toy._EN_EDIT_POSITION):
        allowed |= {w for ws in table.values() for p in ws for w in p.split()}
    allowed |= {w for ws in toy._EN_EDIT_SIZE["train"]["make"].values() for w in ws}
    assert te._EN_HELD <= te._KNOWN_EN
    for s1, _t1, b, kind, new in _edits_beside(plain, scrambled):
        if all(ord(c) < 128 for c in b):
            words = b.split()
            # every held-out word is a known word, so no unknown word is one
            unknown = [w for w in words if w not in te._KNOWN_EN]
            assert 1 <= len(unknown) <= 2 and not set(unknown) & te._EN_HELD, b
            assert set(words) - set(unknown) <= allowed, b  # the rest: attribute words, "a", "the", "it" ...
            tables = {"position": toy._EN_EDIT_POSITION, "size": toy._EN_EDIT_SIZE["train"]["make"]}
            table = tables[kind] if kind in tables else toy._EN[kind]
            said = [w for w in table[new] if f" {w} " in f" {b} "]
            obj = [w for w in toy._EN["shape"][s1.shape] if f" {w} " in f" {b} "]
            if kind != "shape" and said and obj:
                first_new = b.index(f"{said[0]}") < b.index(obj[0])
                orders["new first" if first_new else "object first"] += 1
        else:
            assert not any(h in b for h in te._ZH_HELD), b
            unknown = [c for c in b if ord(c) >= 0x4E00 and c not in te._KNOWN_ZH]
            assert 1 <= len(unknown) <= 4 and set(unknown) <= set(te._UNKNOWN_ZH), b
            table = toy._ZH_EDIT_SIZE["train"] if kind == "size" else toy._ZH[kind]
            said = [w for w in table[new] if w in b]
        assert said, (kind, new, b)  # the new value is named
    assert orders["new first"] > 20 and orders["object first"] > 20, orders
    s = toy.Scene("circle", "red", "left", "large", "white")
    square = toy.edit_target(s, "shape", random.Random(0), "square")
    assert te.scramble_instruction(s, square, random.Random(4)) == "box kagupi the red disk"


def test_reworded_instructions_keep_order_values_and_nouns_but_say_every_other_word_unknown(
    monkeypatch, fits_phrasing
):
    """train_edit.py --reword: a share of training instructions keeps a training phrasing's order, its object, its
    new value and the nouns background/colour, and says each of its other words as a word the toy world never has
    (the same number of words; Chinese, the same number of characters). Scenes stay the same, no held-out word slips
    in, and at 0 the examples are exactly those earlier runs trained on."""
    import hashlib
    import random
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    assert te.REWORD == 0
    digest = hashlib.sha256(repr(te.make_examples(random.Random(3), 300)).encode()).hexdigest()[:16]
    assert digest == "cf24fb6f60abd6cd"
    monkeypatch.setattr(te, "AUGMENT", 0.0)
    monkeypatch.setattr(te, "PHRASINGS", "train+")
    plain = te.make_examples(random.Random(8), 400)
    monkeypatch.setattr(te, "REWORD", 1.0)
    reworded = te.make_examples(random.Random(8), 400)
    templates = {
        lang: [t for table in tables for ts in table["train+"].values() for t in ts]
        for lang, tables in (("en", (toy._EN_EDIT,)), ("zh", (toy._ZH_EDIT,)))
    }
    kept_nouns = 0
    for _s1, _t1, b, kind, new in _edits_beside(plain, reworded):
        zh = any(ord(c) >= 0x4E00 for c in b)
        if zh:
            # no two-character run that only held-out phrasings have ("颜色" is a train+ phrasing's too)
            assert not any(h in b for h in te._ZH_HELD if not any(h in t for t in templates["zh"])), b
            table = toy._ZH_EDIT_SIZE["train"] if kind == "size" else toy._ZH[kind]
        else:
            tables = {"position": toy._EN_EDIT_POSITION, "size": toy._EN_EDIT_SIZE["train"]["make"]}
            table = tables[kind] if kind in tables else toy._EN[kind]
            if kind == "size":
                table = {k: v + toy._EN_EDIT_SIZE["train"]["verb"][k] for k, v in table.items()}
        assert any(w in b for w in table[new]), (kind, new, b)  # the new value is said as training says it
        # some training phrasing, its own words each replaced by one unknown word (kept nouns stay)
        fitted = []
        for t in templates["zh" if zh else "en"]:
            pieces = re.split(r"(\{obj\}|\{new\})", t)
            pattern = ""
            for piece in pieces:
                if piece in ("{obj}", "{new}"):
                    pattern += "(.+?)"
                elif zh:
                    pattern += "".join(
                        re.escape(c) if c in te._KEEP_ZH or ord(c) < 0x4E00 else "[\u4e00-\u9fa5]"
                        for c in piece
                    )
                else:
                    pattern += re.sub(
                        r"[A-Za-z']+",
                        lambda m: m.group(0) if m.group(0).lower() in te._KEEP_EN else "[a-z]+",
                        re.escape(piece),
                    )
            if re.fullmatch(pattern, b):
                fitted.append(t)
        assert fitted, b
        literal = [w for t in fitted for p in re.split(r"\{obj\}|\{new\}", t) for w in p.split()]
        kept_nouns += any(w in ("background", "colour") for w in literal) or "背景" in b or "颜色" in b
        if zh:
            unknown = [c for c in b if ord(c) >= 0x4E00 and c not in te._KNOWN_ZH]
            assert set(unknown) <= set(te._UNKNOWN_ZH)
        else:
            words = re.findall(r"[A-Za-z'-]+", b)
            unknown = [w for w in words if w.lower() not in te._KNOWN_EN]
            assert not {w.lower() for w in unknown} & te._EN_HELD, b
        replaced = {
            sum(
                w.lower() not in te._KEEP_EN and w not in te._KEEP_ZH
                for p in re.split(r"\{obj\}|\{new\}", t)
                for w in re.findall(r"[A-Za-z']+|[\u4e00-\u9fa5]", p)
            )
            for t in fitted
        }
        assert len(unknown) in replaced, (b, fitted)  # each replaced word is one unknown word
    assert kept_nouns > 20
    s = toy.Scene("circle", "red", "left", "large", "white")
    blue = toy.edit_target(s, "colour", random.Random(0), "blue")
    assert te.reword_instruction(s, blue, random.Random(2)) == "vikugu the colour of it to blue"
    assert te.reword_instruction(s, blue, random.Random(2), lang="zh", split="train") != toy.edit_instruction(
        s, blue, random.Random(2), lang="zh", split="train"
    )


def test_reword_background_says_the_background_noun_unknown_too(monkeypatch):
    """--reword-background 1: reworded background edits say neither "background" nor 背景 (a held-out background
    phrasing never does) but still name the new background; recolours keep "colour"; at 0 nothing changes."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    monkeypatch.setattr(te, "AUGMENT", 0.0)
    monkeypatch.setattr(te, "PHRASINGS", "train+")
    monkeypatch.setattr(te, "REWORD", 1.0)
    kept = te.make_examples(random.Random(9), 300)
    monkeypatch.setattr(te, "REWORD_BACKGROUND", 1.0)
    reworded = te.make_examples(random.Random(9), 300)
    backgrounds = nouns_before = 0
    for (s1, t1, a), (s2, t2, b) in zip(kept, reworded, strict=True):
        assert (s1, t1) == (s2, t2)
        if s1 == t1 or s1.background == t1.background:
            continue
        backgrounds += 1
        nouns_before += "background" in a.lower() or "背景" in a
        assert "background" not in b.lower() and "背景" not in b, b
        zh = any(ord(c) >= 0x4E00 for c in b)
        said = (toy._ZH if zh else toy._EN)["background"][t1.background]
        assert any(w in b for w in said), b
    assert backgrounds > 20 and nouns_before > backgrounds // 2
    s = toy.Scene("circle", "red", "left", "large", "white")
    blue = toy.edit_target(s, "colour", random.Random(0), "blue")
    assert "colour" in te.reword_instruction(s, blue, random.Random(2))


def test_reword_swap_exchanges_object_and_new_value_in_the_phrasing(monkeypatch):
    """--reword-swap 1: a reworded phrasing that names both the object and the new value says each where the other
    stood (only the source image then tells which is there now); phrasings naming one of them are unchanged; at 0
    the reworded examples are exactly edit-run17's (no draw)."""
    import hashlib
    import random
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "toy"))
    import train_edit as te

    monkeypatch.setattr(te, "PHRASINGS", "train+")
    monkeypatch.setattr(te, "REWORD", 0.4)
    monkeypatch.setattr(te, "REWORD_BACKGROUND", 0.5)
    assert te.REWORD_SWAP == 0
    digest = hashlib.sha256(repr(te.make_examples(random.Random(3), 300)).encode()).hexdigest()[:16]
    assert digest == "20af75ee85856b0b"  # the same examples as before --reword-swap existed
    monkeypatch.setattr(te, "REWORD_SWAP", 1.0)
    swapped = single = 0
    for i in range(400):
        rng = random.Random(i)
        source = toy.random_scene(rng)
        kind = rng.choice(toy.EDIT_KINDS)
        target = toy.edit_target(source, kind, rng)
        lang = rng.choice(("en", "zh"))
        template, obj, word = toy._edit_parts(source, target, random.Random(1000 + i), lang, "train+")
        text = te.reword_instruction(source, target, random.Random(1000 + i), lang, "train+")
        pieces = [p for p in re.split(r"(\{obj\}|\{new\})", template) if p]

        def says(values: dict, pieces=pieces, text=text) -> bool:
            # the phrasing's own words are unknown words now: any run of characters
            pattern = "".join(re.escape(values[p]) if p in values else ".*?" for p in pieces)
            return re.fullmatch(pattern, text) is not None

        if "{obj}" in pieces and "{new}" in pieces:
            swapped += 1
            assert says({"{obj}": word, "{new}": obj}), (template, obj, word, text)
            assert not says({"{obj}": obj, "{new}": word}), (template, obj, word, text)
        else:
            single += 1
            assert says({"{obj}": obj, "{new}": word}), (template, obj, word, text)
    assert swapped > 100 and single > 20
    for option in ("-0.1", "2"):
        import subprocess

        script = Path(__file__).resolve().parents[1] / "training" / "toy" / "train_edit.py"
        proc = subprocess.run(
            [sys.executable, str(script), "--reword-swap", option],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0 and f"--reword-swap {float(option)}: a share" in proc.stderr


def test_a_training_cut_by_sigterm_saves_what_it_trained(tmp_path):
    """train_edit.py stopped by SIGTERM (``timeout``'s first signal) while training saves the transformer, writes
    results.json saying so, skips the evaluation and exits 143: a job limit never loses the whole run."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-u", str(root / "training" / "toy" / "train_edit.py"), "--smoke", "--minutes", "5",
         "--out", str(out), "--init", str(root / "qwennb" / "toy_edit_model" / "transformer"),
         "--text-encoder", str(root / "qwennb" / "toy_model" / "text_encoder"), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
    )  # fmt: skip
    lines = []
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            lines.append(line)
            if " step 0 loss " in line:
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "".join(lines[-20:])
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 143, text[-2000:]
    assert "the evaluation skipped" in text and "eval heldout" not in text
    assert (out / "transformer" / "config.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["timings"]["stopped"] == "SIGTERM" and saved["timings"]["steps"] >= 1
    assert saved["timings"]["train"] < 12  # stopped at the next step, not at the smoke run's 18 s


def test_choose_edit_refuses_the_evaluation_draw_and_non_model_folders(tmp_path):
    """training/toy/choose_edit.py never chooses on the evaluation's draw (seed 4321) and names a folder without a
    transformer config, each in one usage line before any model loads."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "toy" / "choose_edit.py"
    shipped = Path(__file__).resolve().parents[1] / "qwennb" / "toy_edit_model" / "transformer"
    for argv, message in (
        ([str(shipped), "--seeds", "778", "4321"], "seed 4321 is the evaluation's draw"),
        ([str(shipped), str(tmp_path)], f"not a transformer folder (no config.json): {tmp_path}"),
    ):
        proc = subprocess.run(
            [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_per_item_edit_reader_refuses_unknown_kinds_and_splits_in_one_line():
    """training/toy/per_item_edits.py: a kind or phrasing split that does not exist is one usage line, before any
    model loads."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "toy" / "per_item_edits.py"
    for args, said in (
        (["--kinds", "colour,texture"], "unknown edit kinds ['texture']"),
        (["--split", "test"], "--split"),
    ):
        proc = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_per_item_edit_reader_draws_the_scenes_its_seed_names():
    """``--seed`` picks the draw of scenes (a validation draw beside the evaluation's 4321): each line is the item
    of ``toy.edit_eval_set`` with that seed, read off a real edit."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "toy" / "per_item_edits.py"
    said = {}
    for seed in (4321, 777):
        proc = subprocess.run(
            [sys.executable, str(script), "--n", "5", "--kinds", "background", "--seed", str(seed)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        (line,) = proc.stdout.splitlines()
        said[seed] = json.loads(line)
        (want,) = [i for i in toy.edit_eval_set(5, seed=seed) if i.kind == "background"]
        assert said[seed]["instruction"] == want.instruction
        assert said[seed]["asked"] == want.target.background and said[seed]["was"] == want.source.background
    assert said[4321]["instruction"] != said[777]["instruction"]


def test_average_edit_interpolates_two_transformers_and_refuses_what_it_cannot(tmp_path):
    """training/toy/average_edit.py: the saved transformer is (1 - w) * base + w * other, tensor by tensor; a share
    outside 0-1 or a folder without a transformer is one usage line; two architectures are refused."""
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from diffusers import QwenImageTransformer2DModel

    from qwennb.toy_edit import TOY_EDIT_DIR

    training = Path(__file__).resolve().parents[1] / "training" / "toy"
    sys.path.insert(0, str(training))
    import average_edit as ae

    shipped = Path(TOY_EDIT_DIR) / "transformer"
    base = QwenImageTransformer2DModel.from_pretrained(shipped)
    other = QwenImageTransformer2DModel.from_pretrained(shipped)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3)
    other.save_pretrained(tmp_path / "other")
    pair = ["--base", str(shipped), "--other", str(tmp_path / "other")]
    assert ae.main([*pair, "--weight", "0.25", "--out", str(tmp_path / "avg"), "--eval-n", "0"]) == 0
    got = QwenImageTransformer2DModel.from_pretrained(tmp_path / "avg" / "transformer").state_dict()
    for name, a in base.state_dict().items():  # 0.75 a + 0.25 * 3a = 1.5 a, rounded to fp16 as toy-edit ships
        torch.testing.assert_close(got[name], (1.5 * a).half().float(), rtol=0, atol=0)
    assert not (tmp_path / "avg" / "RESULTS.md").exists()  # --eval-n 0: no evaluation
    # --val-seed: a validation draw of held-out edits on other scenes, scored beside the evaluation's own
    argv = [*pair, "--weight", "0", "--out", str(tmp_path / "val"), "--eval-n", "5", "--val-seed", "777"]
    assert ae.main([*argv, "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "val" / "results.json").read_text())["report"]
    assert report["validation"]["all"]["n"] == report["heldout"]["all"]["n"] == 5
    assert "| validation | all | 5 |" in (tmp_path / "val" / "RESULTS.md").read_text()
    # other scenes, so other scores (the same draw through the same model scores the same to the last digit)
    assert report["validation"]["all"] != report["heldout"]["all"]

    # the base on the device it is evaluated on (a GPU), the other read from disk to the CPU: it follows the base
    # (the meta device stands in for the GPU here: torch refuses a CPU tensor beside it as beside a CUDA one)
    on_device = ae.average({"w": torch.zeros(2, device="meta")}, {"w": torch.ones(2)}, 0.5)
    assert on_device["w"].device.type == "meta"
    small = {"w": torch.zeros(2)}
    with pytest.raises(SystemExit, match="not one architecture"):
        ae.average(small, {"w": torch.zeros(3)}, 0.5)
    with pytest.raises(SystemExit, match="differ in their tensors"):
        ae.average(small, {"v": torch.zeros(2)}, 0.5)
    for args, said in (
        (["--weight", "1.5"], "--weight 1.5: the other model's share, from 0 to 1"),
        (["--other", str(tmp_path)], "not a transformer folder"),
        (["--val-seed", "4321"], "--val-seed 4321 is the evaluation's own draw"),
        (["--device", "cuda"], "--device cuda: no CUDA GPU here"),
    ):
        argv = [*pair, "--out", str(tmp_path / "x"), *args]
        proc = subprocess.run(
            [sys.executable, str(training / "average_edit.py"), *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_choose_edit_scores_a_candidate_as_the_training_evaluation_does(tmp_path):
    """choose_edit.py and train_edit.evaluate carry out edits through one function: on the same validation draw, at
    the same steps, the shipped model scores the same in both; choose_edit writes every score and a table row."""
    import importlib
    import io
    import sys
    from contextlib import redirect_stdout
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "training" / "toy"
    sys.path.insert(0, str(folder))
    try:
        choose = importlib.import_module("choose_edit")
        te = importlib.import_module("train_edit")
    finally:
        sys.path.remove(str(folder))
    shipped = Path(__file__).resolve().parents[1] / "qwennb" / "toy_edit_model" / "transformer"
    out = io.StringIO()
    with redirect_stdout(out):
        rc = choose.main(
            [str(shipped), "--seeds", "778", "--n", "5", "--steps", "3", "--out", str(tmp_path / "c.json")]
        )
    assert rc == 0 and f"| {shipped} |" in out.getvalue()
    saved = json.loads((tmp_path / "c.json").read_text())["results"][str(shipped)]
    assert saved["pooled"]["all"]["n"] == 5
    from qwennb.toy_edit import assemble_toy_edit

    report = te.evaluate(assemble_toy_edit(), 5, tmp_path, seed=778, splits=("heldout",), steps=3)
    for score in (saved["draws"]["778"], report["heldout"]):
        score.pop("seconds")
    assert saved["draws"]["778"] == report["heldout"]
    assert (tmp_path / "samples.png").is_file() and len(
        (tmp_path / "samples.txt").read_text().splitlines()
    ) == 5
