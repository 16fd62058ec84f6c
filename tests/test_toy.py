"""The toy world's definition and its evaluator (``qwennb.toy``): what the toy model's tests will judge it by."""

from __future__ import annotations

import random

import numpy as np
import pytest

from qwennb import toy


def _scenes(n: int, seed: int = 0) -> list[toy.Scene]:
    rng = random.Random(seed)
    return [toy.random_scene(rng) for _ in range(n)]


@pytest.mark.parametrize("size", [(256, 256), (128, 128), (256, 128), (128, 256)])
def test_read_image_reads_back_every_attribute_of_rendered_scenes(size):
    w, h = size
    scenes = _scenes(60, seed=w + h)
    images = toy.render_batch(scenes, w, h)
    for scene, x in zip(scenes, images, strict=True):
        arr = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        assert toy.read_image(arr).attributes() == scene.attributes()


def test_every_shape_colour_background_pair_is_told_apart():
    # white on beige is the closest pair (61 apart in RGB): the per-background threshold must still see it
    for shape in toy.SHAPES:
        for colour in toy.COLOURS:
            for bg in toy.BACKGROUNDS:
                if colour == bg:
                    continue
                r = toy.read_image(toy.render(toy.Scene(shape, colour, "center", "small", bg), 128, 128))
                assert (r.shape, r.colour, r.background) == (shape, colour, bg)


def test_positions_follow_the_image_not_the_square():
    # "top" of a portrait image is the top even though the image is taller than wide
    r = toy.read_image(toy.render(toy.Scene("circle", "red", "top", "large", "white"), 128, 256))
    assert r.position == "top" and r.centre[1] < 0.35
    r = toy.read_image(toy.render(toy.Scene("circle", "red", "right", "large", "white"), 256, 128))
    assert r.position == "right" and r.centre[0] > 0.65


def test_blank_image_reads_no_shape():
    img = np.full((64, 64, 3), 128, dtype=np.uint8)
    r = toy.read_image(img)
    assert (r.background, r.shape, r.colour) == ("gray", None, None)


def test_a_shape_in_the_wrong_colour_is_read_as_that_colour():
    img = toy.render(toy.Scene("square", "green", "left", "large", "white"))
    assert toy.read_image(img).colour == "green"
    assert toy.read_image(img).colour != "red"


def test_scene_refuses_a_shape_on_its_own_colour():
    with pytest.raises(ValueError, match="not in the toy world"):
        toy.Scene("circle", "white", "left", "large", "white")
    with pytest.raises(ValueError, match="unknown shape"):
        toy.Scene("hexagon", "red", "left", "large", "white")


def test_random_scenes_never_put_a_shape_on_its_own_colour():
    assert all(s.colour != s.background for s in _scenes(500))


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "a red circle on the left, white background",
            {"colour": "red", "shape": "circle", "position": "left", "background": "white"},
        ),
        (
            "A tiny violet pentagram near the bottom against a grey background.",
            {
                "colour": "purple",
                "shape": "star",
                "position": "bottom",
                "size": "small",
                "background": "gray",
            },
        ),
        (
            "the background is black; a big white box in the middle",
            {
                "colour": "white",
                "shape": "square",
                "position": "center",
                "size": "large",
                "background": "black",
            },
        ),
        (
            "一个红色的圆形在左边，白色背景",
            {"colour": "red", "shape": "circle", "position": "left", "background": "white"},
        ),
        (
            "米色背景上有一个很大的蓝色三角形，在右侧",
            {
                "colour": "blue",
                "shape": "triangle",
                "position": "right",
                "size": "large",
                "background": "beige",
            },
        ),
        ("a star", {"shape": "star"}),
    ],
)
def test_parse_reads_the_attributes_a_prompt_names(prompt, expected):
    assert toy.parse(prompt) == expected


def test_captions_name_what_they_keep_and_parse_back():
    rng = random.Random(3)
    keep_all = dict.fromkeys(toy.ATTRIBUTES, 0.0)
    for scene in _scenes(200, seed=9):
        for lang in ("en", "zh"):
            for split in ("train", "heldout"):
                text = toy.caption(scene, rng, lang=lang, drop=keep_all, split=split)
                assert toy.parse(text) == scene.attributes(), text


def test_dropped_attributes_are_absent_from_the_caption():
    rng = random.Random(4)
    drop_colour = {"colour": 1.0}
    for scene in _scenes(50, seed=5):
        assert "colour" not in toy.parse(toy.caption(scene, rng, drop=drop_colour))


def test_heldout_phrasings_never_appear_in_training_captions():
    rng = random.Random(6)
    train_text = " ".join(toy.caption(s, rng, drop={}) for s in _scenes(3000, seed=7))
    for phrases in toy._EN_POSITION["heldout"].values():
        for phrase in phrases:
            assert phrase not in train_text.lower()
    for pattern in toy._EN_BACKGROUND["heldout"]:
        assert pattern.split("{}")[0].strip() not in train_text.lower()


def test_eval_set_is_deterministic_bilingual_and_large_enough():
    a, b = toy.eval_set(), toy.eval_set()
    assert a == b and len(a) == 240
    assert sum(i.lang == "zh" for i in a) == 120
    assert len({i.seed for i in a}) == 120  # each scene's English and Chinese prompt share a seed
    assert all(toy.parse(i.prompt) == i.expected for i in a)


def test_score_counts_right_and_wrong_attributes():
    items = toy.eval_set(4)
    right = [toy.render(toy.Scene(size="large", **i.expected)) for i in items]
    assert toy.score(items, right)["all"]["all_four"] == 1.0
    wrong_colour = []
    for i in items:
        colour = next(c for c in toy.COLOURS if c not in (i.expected["colour"], i.expected["background"]))
        wrong_colour.append(toy.render(toy.Scene(size="large", **{**i.expected, "colour": colour})))
    s = toy.score(items, wrong_colour)["all"]
    assert s["colour"] == 0.0 and s["shape"] == 1.0 and s["all_four"] == 0.0


def test_more_training_phrasings_are_new_sentence_shapes_and_never_a_held_out_one(fits_phrasing):
    """The "train+" edit phrasings (train_edit.py --phrasings train+) are the training ones and more sentence shapes,
    the new value before the object too, and no instruction they make fits a held-out template."""
    held = [
        fits_phrasing(t)
        for table in (toy._EN_EDIT, toy._ZH_EDIT)
        for ts in table["heldout"].values()
        for t in ts
    ]
    rng = random.Random(8)
    more, held_out = [], []
    for k in range(3000):
        source = toy.random_scene(rng)
        target = toy.edit_target(source, toy.EDIT_KINDS[k % len(toy.EDIT_KINDS)], rng)
        lang = "en" if k % 2 else "zh"
        more.append(toy.edit_instruction(source, target, rng, lang=lang, split="train+"))
        held_out.append(toy.edit_instruction(source, target, rng, lang=lang, split="heldout"))
    assert [t for t in more if any(h.fullmatch(t) for h in held)] == []
    assert all(any(h.fullmatch(t) for h in held) for t in held_out)  # the check above can fail
    for table in (toy._EN_EDIT, toy._ZH_EDIT):
        for kind, templates in table["train"].items():
            assert table["train+"][kind][: len(templates)] == templates
        first = [t for t in table["train+"]["shape"] if "{obj}" in t and t.index("{new}") < t.index("{obj}")]
        assert first and not [t for t in table["train"]["shape"] if t in first]
        made = [t for t in more if any(fits_phrasing(f).fullmatch(t) for f in first)]
        assert made, "no instruction of the new sentence shapes was drawn"
    with pytest.raises(ValueError, match="unknown phrasing split"):
        toy.edit_instruction(source, target, rng, split="test")
