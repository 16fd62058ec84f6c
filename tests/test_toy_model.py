"""The embedded toy model through the real pipeline: tests of meaning (what the image shows), not of pixels.

The toy model (``qwennb/toy_model``) is Qwen-Image's own architecture at a small size, trained on the toy
world of :mod:`qwennb.toy`: one flat shape on a plain background. It is loaded here as users load it
(``Session().load("toy")``: resolve, plan, ``from_pretrained``) and every image is read back with
``toy.read_image``. Thresholds come from measurements on the CPU (20 steps, 256x256; the numbers are in the
comments) with a margin. Held-out phrasings (never seen in training) and prompts in words of our own are
asserted too since run 8 (trained with its captions rebuilt from their parts and padded with words that say
nothing: runs 5-7 drew the named position on training phrasings and at the centre on held-out ones). A negative
prompt steers away from a colour when it names it in a phrase ("a red circle", "红色的圆形"); the bare word "red"
does not (run 8's evaluation: red in 12.5% of 40 seeds with " " and with "red" alike; the toy's text encoder reads
a one-word caption much as an empty one).
"""

from __future__ import annotations

import numpy as np
import pytest

from qwennb import toy
from qwennb.session import Session

STEPS, SIZE = 20, 256
# Training phrasings (toy.eval_set(split="train")): 16 items, 8 scenes, each in English and in Chinese.
TRAIN_ITEMS = toy.eval_set(16, split="train", seed=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    # One thread: on a CPU shared with other processes, torch's two threads wait on each other at every
    # operation (measured on 2 busy cores: 12-37 s an image with 2 threads, 2.6 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def session():
    s = Session()
    report = s.load("toy")
    assert report.model == "toy" and report.path and report.path.endswith("toy_model")
    yield s
    s.unload()


def draw(session, prompt, seed, cfg=4.0, width=SIZE, height=SIZE, **kw):
    r = session.generate(prompt, seed=seed, steps=STEPS, cfg=cfg, width=width, height=height, **kw)
    assert r.images[0].size == (width, height)
    return r.images[0]


@pytest.fixture(scope="module")
def train_images(session):
    """The training-phrasing items at CFG 4 and at CFG 1, same seeds."""
    return {cfg: [draw(session, i.prompt, i.seed, cfg=cfg) for i in TRAIN_ITEMS] for cfg in (4.0, 1.0)}


def position_error(reading, expected_position):
    """Distance (fractions of the image) from the shape's centre to where the prompt's position puts it."""
    x, y = toy.POSITIONS[expected_position]
    return float(np.hypot(reading.centre[0] - x, reading.centre[1] - y))


def test_follows_colour_shape_position_and_background_in_training_phrasings(train_images):
    # Measured (CPU, run 6, these 16 items and two other 16-item sets, seeds 1-3, CFG 4): colour, shape, position
    # and background 1.0 in English and in Chinese on all three (run 5 drew blobs: shape 0.19).
    scores = toy.score(TRAIN_ITEMS, train_images[4.0])
    print(scores)
    for group, least in (("all", 0.8), ("en", 0.75), ("zh", 0.75)):
        for attribute in ("colour", "shape", "position", "background"):
            assert scores[group][attribute] >= least, (group, attribute, scores[group])


def test_cfg_4_places_the_shape_closer_than_cfg_1(train_images):
    # Measured (run 5) on 3 sets of 16 items (same seeds at both CFGs), colour+position right out of 32: CFG 4 32/31/32,
    # CFG 1 31/30/32: too close to assert more than "not worse". The shape's distance from where the prompt puts
    # it is the robust difference: median 0.019 vs 0.031 here (0.023 vs 0.033 and 0.016 vs 0.026 on the other
    # sets; ratio 0.59-0.70). A CFG that silently did nothing would give equal numbers.
    right = {}
    errors = {}
    for cfg, images in train_images.items():
        reads = [toy.read_image(im) for im in images]
        right[cfg] = sum(
            (r.colour == i.expected["colour"]) + (r.position == i.expected["position"])
            for r, i in zip(reads, TRAIN_ITEMS, strict=True)
        )
        errors[cfg] = float(
            np.median(
                [position_error(r, i.expected["position"]) for r, i in zip(reads, TRAIN_ITEMS, strict=True)]
            )
        )
    print("colour+position right", right, "median position error", errors)
    assert right[4.0] >= right[1.0]
    assert errors[4.0] < 0.85 * errors[1.0]


def test_same_seed_same_pixels_other_seeds_other_layouts(session):
    # "a shape" leaves colour, position and background open: the seed decides them. 128x128 (a training size)
    # to save time. Measured for seeds 100-111: 11 different (colour, position) pairs; 100-103 give 4.
    a = draw(session, "a shape", 100, width=128, height=128)
    b = draw(session, "a shape", 100, width=128, height=128)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    others = [draw(session, "a shape", s, width=128, height=128) for s in (101, 102, 103)]
    layouts = {(r.colour, r.position) for r in map(toy.read_image, [a, *others])}
    print(layouts)
    assert len(layouts) >= 3


def test_follows_held_out_phrasings(session):
    # Held-out phrasings (toy.eval_set's "heldout" split: words training never used around the attribute words).
    # Measured (CPU, run 8, 32 items of seed 1 at 256x256): colour 1.0, shape 1.0, position 0.94 (en 0.88,
    # zh 1.0), background 1.0; run 6 (the model before) 0.98 / 0.64 / 0.56 / 0.81 on 96 such items. The first
    # 12 of them here (at 128x128 small shapes read as blobs more often: shape 0.75 on these 12).
    items = toy.eval_set(12, split="heldout", seed=1)
    images = [draw(session, i.prompt, i.seed, width=i.width, height=i.height) for i in items]
    scores = toy.score(items, images)
    print(scores)
    for attribute in ("colour", "shape", "position", "background"):
        assert scores["all"][attribute] >= 0.75, (attribute, scores["all"])


# Prompts in words of our own (neither split of toy.caption's phrasings; "sketch", "canvas", "bg", "toward",
# "lower part", a Chinese measure word 颗 and 在图的左边): measured 6/6 with all four attributes right (run 8,
# seed 7, 256x256); at 128x128 here.
OWN_WORDS = [
    (
        "Could you sketch a blue triangle sitting at the far right, grey background?",
        "blue triangle right gray",
    ),
    ("I'd like a yellow circle near the top, backdrop black", "yellow circle top black"),
    ("green star, lower part, white bg", "green star bottom white"),
    ("一颗紫色的星星，在图的左边，背景是米色的", "purple star left beige"),
    ("put an orange square in the middle on a white canvas", "orange square center white"),
    ("a red disc toward the left against black", "red circle left black"),
]


def test_follows_prompts_in_other_words(session):
    right = 0
    for prompt, expected in OWN_WORDS:
        r = toy.read_image(draw(session, prompt, 7, width=128, height=128))
        got = f"{r.colour} {r.shape} {r.position} {r.background}"
        print(prompt, "->", got)
        right += got == expected
    assert right >= 5, right


OPEN_COLOUR = "a circle on a white background"  # the colour left open: the seed decides it
NEGATIVE_SEEDS = range(500, 532)  # those of training/toy/train.py's negative-prompt check


def red_count(session, **kw):
    return sum(
        toy.read_image(draw(session, OPEN_COLOUR, seed, width=128, height=128, **kw)).colour == "red"
        for seed in NEGATIVE_SEEDS
    )


@pytest.fixture(scope="module")
def reds_without_negative(session):
    return red_count(session)


@pytest.mark.parametrize("negative", ["a red circle", "红色的圆形"])
def test_a_negative_prompt_naming_the_colour_pulls_it_away(session, reds_without_negative, negative):
    # Measured at 128x128: red in 5 of 32 without a negative prompt, in 0 of 32 with either negative here (the
    # colour then goes mostly to orange: the guidance pushes away from red, not towards an even spread); the
    # bare word "red" as the negative leaves red in 4 of 32 at 256x256.
    assert reds_without_negative >= 3
    assert red_count(session, negative_prompt=negative) == 0


@pytest.mark.parametrize(
    "prompt",
    ["一个红色的圆形在左边，白色背景", "蓝色的正方形在右边，黑色背景", "一个绿色的三角形在上方，灰色背景"],
)
def test_chinese_prompts(session, prompt):
    # Measured: these and two more Chinese prompts, seeds 1 and 2, at 256x256 and at 128x128 (used here, to
    # save time; the Chinese half of the training-phrasing items above is at 256x256): colour, position and
    # background all right, 10/10 at each size.
    expected = toy.parse(prompt)
    r = toy.read_image(draw(session, prompt, 1, width=128, height=128))
    assert (r.colour, r.position, r.background) == (
        expected["colour"],
        expected["position"],
        expected["background"],
    )


@pytest.mark.parametrize(
    "prompt, top",
    [
        ("a red circle at the top, white background", True),
        ("a blue square at the bottom, white background", False),
    ],
)
def test_top_and_bottom_of_a_portrait_image(session, prompt, top):
    # 128 wide, 256 high. Measured (4 prompts x 3 seeds): the centre at 0.26-0.30 of the height for "top",
    # 0.72-0.77 for "bottom".
    r = toy.read_image(draw(session, prompt, 1, width=128, height=256))
    assert (r.centre[1] < 0.5) if top else (r.centre[1] > 0.5), r.centre
    assert r.position == ("top" if top else "bottom")


def test_cli_generate_draws_what_the_prompt_says(tmp_path, monkeypatch, capsys):
    # `qwennb generate PROMPT` with no --model on a machine without Qwen-Image weights: the embedded toy model.
    import qwennb.pipeline
    from qwennb import load_params
    from qwennb.cli import main

    monkeypatch.delenv("QWENNB_MODEL", raising=False)
    monkeypatch.setattr(qwennb.pipeline, "find_local_models", lambda folder=None: [])
    assert (
        main(
            ["generate", "a red circle on the left, white background", "--seed", "3", "--out", str(tmp_path)]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "embedded toy model" in err
    (path,) = [line for line in out.splitlines() if line.endswith(".png")]
    r = toy.read_image(path)
    assert (r.colour, r.position, r.background) == ("red", "left", "white")
    params = load_params(path)
    assert (params["steps"], params["cfg"], params["width"], params["height"]) == (20, 4.0, 256, 256)
