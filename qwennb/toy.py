"""The toy world: flat shapes on plain backgrounds, the captions that describe them, and an evaluator.

The embedded ``toy`` model (``qwennb/toy_model``, trained by ``training/toy/train.py``) is Qwen-Image's own
architecture at a small size, trained on this world, so it draws what a prompt says: one flat-coloured
upright shape (circle, square, triangle, five-pointed star) in one of eight colours, at the left, right,
top, bottom or centre, small or large, on a white, gray, black or beige background. Prompts can be English
or Chinese, in many phrasings; an attribute a prompt leaves out is drawn at random.

This module is the fixed definition of that world, shared by the training script, the tests and anyone
who wants to check an image: :func:`render` draws a scene, :func:`caption` describes one, :func:`parse`
reads the attributes a prompt names, :func:`read_image` reads them back off an image, and
:func:`eval_set` / :func:`score` turn that into adherence figures. No diffusers import: it is plain
numpy/torch and Pillow.

Example:
    >>> from qwennb import toy
    >>> scene = toy.Scene(shape="circle", colour="red", position="left", size="large", background="white")
    >>> image = toy.render(scene, 256, 256)
    >>> r = toy.read_image(image)
    >>> (r.shape, r.colour, r.position, r.size, r.background)
    ('circle', 'red', 'left', 'large', 'white')
    >>> toy.parse("一个红色的圆形在左边，白色背景")
    {'colour': 'red', 'shape': 'circle', 'position': 'left', 'background': 'white'}
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "EDIT_KINDS",
    "EditItem",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "EvalItem",
    "Reading",
    "Scene",
    "caption",
    "edit_eval_set",
    "edit_instruction",
    "edit_target",
    "eval_set",
    "parse",
    "random_scene",
    "read_image",
    "render",
    "render_batch",
    "score",
    "score_edits",
]

# ---------------------------------------------------------------------------------------------------------
# The world (fixed by the toy-model issue: anyone can write a checker against these numbers)
# ---------------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "beige": (235, 220, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
POSITIONS: dict[str, tuple[float, float]] = {  # centre of the shape, as fractions of width and height
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
SIZES: dict[str, float] = {"small": 0.12, "large": 0.21}  # "radius" as a fraction of min(width, height)
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position", "size", "background")

# Shape geometry in units of the scene's radius R: chosen so that the four shapes cover similar areas
# (1.7-3.1 R^2) and differ clearly in how much of their bounding box they fill (what read_image uses).
_SQUARE_HALF = 0.85
_TRIANGLE_R = 1.15  # circumradius of the equilateral triangle (point up)
_STAR_R, _STAR_INNER = 1.15, 0.45  # outer radius, inner/outer ratio of the five-pointed star


@dataclass(frozen=True)
class Scene:
    """One toy image: a shape, its colour, where it is, how big, on which background.

    ``dx``/``dy``/``scale`` jitter the position (fractions of width/height) and the radius (a factor).
    """

    shape: str
    colour: str
    position: str
    size: str
    background: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("position", self.position, POSITIONS),
            ("size", self.size, SIZES),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; the toy world has {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(
                f"a {self.colour} shape on a {self.background} background is not in the toy world"
            )

    def attributes(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ("colour", "shape", "position", "size", "background")}


def random_scene(rng: random.Random, **fixed: str) -> Scene:
    """A random scene; keyword arguments fix attributes (``colour="red"``). The background never equals
    the shape's colour.

    Example:
        >>> s = random_scene(random.Random(0), colour="white")
        >>> s.colour, s.background != "white"
        ('white', True)
    """
    shape = fixed.get("shape") or rng.choice(SHAPES)
    colour = fixed.get("colour") or rng.choice(list(COLOURS))
    position = fixed.get("position") or rng.choice(list(POSITIONS))
    size = fixed.get("size") or rng.choice(list(SIZES))
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    background = fixed.get("background") or rng.choice(backgrounds)
    if background == colour:
        colour = rng.choice([c for c in COLOURS if c != background])
    return Scene(
        shape,
        colour,
        position,
        size,
        background,
        dx=rng.uniform(-0.03, 0.03),
        dy=rng.uniform(-0.03, 0.03),
        scale=rng.uniform(0.9, 1.1),
    )


# ---------------------------------------------------------------------------------------------------------
# Rendering (torch, batched: the training script draws millions of scenes on the GPU with this)
# ---------------------------------------------------------------------------------------------------------


def _polygon(shape: str) -> np.ndarray:
    """Vertices (x, y; y points down) of a shape of radius 1 centred at the origin."""
    if shape == "square":
        a = _SQUARE_HALF
        return np.array([[-a, -a], [a, -a], [a, a], [-a, a]], dtype=np.float64)
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return _TRIANGLE_R * np.stack([np.cos(angles), np.sin(angles)], 1)
    if shape == "star":
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, _STAR_R, _STAR_R * _STAR_INNER)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    raise ValueError(shape)


def render_batch(scenes: Sequence[Scene], width: int, height: int, device: Any = "cpu", supersample: int = 2):
    """Draw scenes as a float tensor (N, 3, height, width) in [-1, 1] (the VAE's range), anti-aliased by
    ``supersample``² samples a pixel.

    Example:
        >>> x = render_batch([Scene("star", "blue", "center", "large", "white")], 64, 32)
        >>> tuple(x.shape), float(x.min()) >= -1.0
        ((1, 3, 32, 64), True)
    """
    import torch

    n, s = len(scenes), supersample
    ys = (torch.arange(height * s, device=device, dtype=torch.float32) + 0.5) / s
    xs = (torch.arange(width * s, device=device, dtype=torch.float32) + 0.5) / s
    short = float(min(width, height))
    centre = torch.tensor(
        [
            ((POSITIONS[c.position][0] + c.dx) * width, (POSITIONS[c.position][1] + c.dy) * height)
            for c in scenes
        ],
        device=device,
        dtype=torch.float32,
    )
    radius = torch.tensor(
        [SIZES[c.size] * c.scale * short for c in scenes], device=device, dtype=torch.float32
    )
    px = (xs[None, None, :] - centre[:, 0, None, None]) / radius[:, None, None]  # (N, 1, W)
    py = (ys[None, :, None] - centre[:, 1, None, None]) / radius[:, None, None]  # (N, H, 1)
    inside = torch.zeros(n, height * s, width * s, device=device, dtype=torch.bool)
    for shape in SHAPES:
        sel = [i for i, c in enumerate(scenes) if c.shape == shape]
        if not sel:
            continue
        ix = torch.tensor(sel, device=device)
        qx, qy = px[ix], py[ix]
        if shape == "circle":
            inside[ix] = qx * qx + qy * qy <= 1.0
            continue
        poly = _polygon(shape)
        crossings = torch.zeros(len(sel), height * s, width * s, device=device, dtype=torch.bool)
        for k in range(len(poly)):
            (x1, y1), (x2, y2) = poly[k], poly[(k + 1) % len(poly)]
            if y1 == y2:
                continue  # a horizontal edge is never crossed by a horizontal ray
            straddles = (y1 > qy) != (y2 > qy)
            x_at = (x2 - x1) * (qy - y1) / (y2 - y1) + x1
            crossings ^= straddles & (qx < x_at)
        inside[ix] = crossings
    fg = torch.tensor([COLOURS[sc.colour] for sc in scenes], device=device, dtype=torch.float32)
    bg = torch.tensor([BACKGROUNDS[sc.background] for sc in scenes], device=device, dtype=torch.float32)
    m = inside[:, None].float()
    img = m * fg[:, :, None, None] + (1 - m) * bg[:, :, None, None]
    if s > 1:
        img = torch.nn.functional.avg_pool2d(img, s)
    return img / 127.5 - 1.0


def render(scene: Scene, width: int = 256, height: int = 256):
    """Draw one scene as a PIL image.

    Example:
        >>> render(Scene("square", "green", "top", "small", "beige"), 128, 64).size
        (128, 64)
    """
    from PIL import Image

    x = render_batch([scene], width, height)[0]
    arr = ((x.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# ---------------------------------------------------------------------------------------------------------
# Words: captions (training and held-out phrasings, English and Chinese) and parsing prompts
# ---------------------------------------------------------------------------------------------------------

# Each attribute value has English and Chinese words. The first word is the canonical one; "heldout"
# words are never used in training captions (they exist so that the evaluation says something about
# phrasings the model did not see).
_EN = {
    "colour": {
        "red": ["red", "scarlet"],
        "orange": ["orange"],
        "yellow": ["yellow"],
        "green": ["green"],
        "blue": ["blue"],
        "purple": ["purple", "violet"],
        "white": ["white"],
        "black": ["black"],
    },
    "shape": {
        "circle": ["circle", "disc", "round dot", "disk"],
        "square": ["square", "box"],
        "triangle": ["triangle"],
        "star": ["star", "five-pointed star", "pentagram"],
    },
    "size": {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]},
    "background": {
        "white": ["white"],
        "gray": ["gray", "grey"],
        "black": ["black"],
        "beige": ["beige", "cream"],
    },
}
_ZH = {
    "colour": {
        "red": ["红色", "红"],
        "orange": ["橙色", "橘色"],
        "yellow": ["黄色", "黄"],
        "green": ["绿色", "绿"],
        "blue": ["蓝色", "蓝"],
        "purple": ["紫色", "紫"],
        "white": ["白色", "白"],
        "black": ["黑色", "黑"],
    },
    "shape": {
        "circle": ["圆形", "圆", "圆圈"],
        "square": ["正方形", "方块", "方形"],
        "triangle": ["三角形"],
        "star": ["五角星", "星星", "星形"],
    },
    "size": {"small": ["小", "小小"], "large": ["大", "很大"]},
    "position": {
        "left": ["左边", "左侧"],
        "right": ["右边", "右侧"],
        "top": ["上方", "顶部", "上面"],
        "bottom": ["下方", "底部", "下面"],
        "center": ["中间", "中央", "正中"],
    },
    "background": {"white": ["白色"], "gray": ["灰色"], "black": ["黑色"], "beige": ["米色", "米黄色"]},
}
_EN_POSITION = {
    "train": {
        "left": [
            "on the left",
            "at the left",
            "to the left",
            "on the left side",
            "in the left part of the image",
            "at the left edge",
            "on the left of the frame",
            "far left",
        ],
        "right": [
            "on the right",
            "at the right",
            "to the right",
            "on the right side",
            "in the right part of the image",
            "at the right edge",
            "on the right of the frame",
            "far right",
        ],
        "top": [
            "at the top",
            "on top",
            "in the upper part",
            "near the top",
            "at the top of the image",
            "high in the image",
            "up high",
            "at the top of the frame",
        ],
        "bottom": [
            "at the bottom",
            "in the lower part",
            "near the bottom",
            "at the bottom of the image",
            "low in the image",
            "down low",
            "at the bottom of the frame",
        ],
        "center": [
            "in the center",
            "in the middle",
            "at the centre",
            "centered",
            "in the centre of the image",
            "right at the center",
            "in the middle of the frame",
        ],
    },
    "heldout": {
        "left": ["placed on the left-hand side", "over to the left"],
        "right": ["placed on the right-hand side", "over to the right"],
        "top": ["up at the top edge", "high up in the frame"],
        "bottom": ["down at the bottom edge", "low in the frame"],
        "center": ["right in the middle", "in the very center"],
    },
}
_EN_BACKGROUND = {
    "train": [
        "on a {} background",
        "{} background",
        "against a {} background",
        "with a {} background",
        "on {}",
        "the background is {}",
        "background: {}",
        "on a plain {} background",
        "on a {} backdrop",
        "{} backdrop",
        "in front of a {} background",
        "the backdrop is {}",
        "on a solid {} background",
    ],
    "heldout": ["set against a {} backdrop", "over a flat {} backdrop"],
}
_EN_PREFIX = {
    "train": [
        "",
        "",
        "",
        "a picture of ",
        "an image of ",
        "draw ",
        "a drawing of ",
        "a flat illustration of ",
        "show ",
        "there is ",
        "generate ",
        "make ",
        "render ",
        "i want ",
        "create ",
        "an illustration of ",
        "a minimal image of ",
        "a clean picture with ",
        "here is ",
        "an icon of ",
    ],
    "heldout": ["please paint ", "a simple graphic showing "],
}
# Words that say nothing about the scene, so that the model learns to look past words it does not know.
_EN_FILLERS = ["nice", "clean", "single", "solid", "bold", "flat", "neat", "cute", "plain", "lone"]
_EN_SUFFIX = [
    ", minimal",
    ", flat colours",
    ", vector style",
    " with nothing else",
    ", nothing else",
    ", clean",
]
_ZH_TEMPLATES = {
    "train": [
        "{bg}背景上有一个{obj}，在{pos}",
        "{pos}有一个{obj}，背景是{bg}",
        "一个{obj}位于{pos}，{bg}背景",
        "{obj}在{pos}，{bg}背景",
        "画一个{obj}，在{pos}，背景为{bg}",
        "在{pos}画一个{obj}，{bg}背景",
        "{bg}的背景，{pos}有一个{obj}",
        "背景是{bg}，{obj}在{pos}",
        "一个{obj}，位置在{pos}，背景{bg}",
        "{obj}，{pos}，{bg}背景",
        "生成一张图：{bg}背景，{pos}一个{obj}",
        "底色为{bg}，一个{obj}在{pos}",
        "{bg}底，{pos}有个{obj}",
    ],
    "heldout": ["请在{bg}的背景上画一个{obj}，放在{pos}", "{pos}是一个{obj}，底色{bg}"],
}
_ZH_PREFIX = ["", "", "", "", "一张图片：", "简单的图：", "扁平风格，", "帮我画："]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(
    scene: Scene,
    rng: random.Random,
    lang: str = "en",
    drop: dict[str, float] | None = None,
    split: str = "train",
) -> str:
    """Describe ``scene`` in words; each attribute is left out with probability ``drop[attr]``.

    ``split="heldout"`` uses phrasings that training never sees. A caption that leaves an attribute out
    means "any value" (the scene still has one).

    Example:
        >>> caption(Scene("circle", "red", "left", "large", "white"), random.Random(3),
        ...         drop={"size": 0.0, "position": 0.0, "background": 0.0, "colour": 0.0, "shape": 0.0})
        'A drawing of one nice big scarlet disc, on a white backdrop, far left'
    """
    drop = drop or {}
    keep = {a: rng.random() >= drop.get(a, 0.0) for a in ATTRIBUTES}
    if not keep["shape"] and not keep["colour"]:
        keep["shape"] = True  # something has to be the object of the sentence
    if lang == "zh":
        return _caption_zh(scene, rng, keep, split)
    words = _EN
    obj = []
    if split == "train" and rng.random() < 0.15:
        obj.append(rng.choice(_EN_FILLERS))
    if keep["size"]:
        obj.append(rng.choice(words["size"][scene.size]))
    if keep["colour"]:
        obj.append(rng.choice(words["colour"][scene.colour]))
    obj.append(rng.choice(words["shape"][scene.shape]) if keep["shape"] else "shape")
    obj_text = " ".join(obj)
    prefix = rng.choice(_EN_PREFIX[split])
    article = _article(obj_text) if rng.random() < 0.85 else "one"
    parts = [f"{prefix}{article} {obj_text}"]
    extras = []
    if keep["position"]:
        extras.append(rng.choice(_EN_POSITION[split][scene.position]))
    bg = None
    if keep["background"]:
        bg = rng.choice(_EN_BACKGROUND[split]).format(rng.choice(words["background"][scene.background]))
    sep = rng.choice([" ", ", "])
    if bg and split == "train" and not prefix and rng.random() < 0.25:
        # the background first: "On a gray background, a red circle at the top"
        text = bg + ", " + sep.join(parts + extras)
    else:
        if bg:
            extras.append(bg)
        rng.shuffle(extras)
        text = sep.join(parts + extras)
    if split == "train" and rng.random() < 0.1:
        text += rng.choice(_EN_SUFFIX)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    return text


def _caption_zh(scene: Scene, rng: random.Random, keep: dict[str, bool], split: str) -> str:
    words = _ZH
    obj = ""
    if keep["size"]:
        obj += rng.choice(words["size"][scene.size]) + "的"
    if keep["colour"]:
        obj += rng.choice(words["colour"][scene.colour]) + ("的" if rng.random() < 0.5 else "")
    obj += rng.choice(words["shape"][scene.shape]) if keep["shape"] else "图形"
    pos = rng.choice(words["position"][scene.position]) if keep["position"] else None
    bg = rng.choice(words["background"][scene.background]) if keep["background"] else None
    if pos and bg:
        text = rng.choice(_ZH_TEMPLATES[split]).format(obj=obj, pos=pos, bg=bg)
    elif pos:
        text = rng.choice(["{pos}有一个{obj}", "一个{obj}在{pos}", "{obj}位于{pos}"]).format(obj=obj, pos=pos)
    elif bg:
        text = rng.choice(["{bg}背景上的一个{obj}", "一个{obj}，{bg}背景"]).format(obj=obj, bg=bg)
    else:
        text = rng.choice(["一个{obj}", "画一个{obj}"]).format(obj=obj)
    if split == "train":
        text = rng.choice(_ZH_PREFIX) + text
    return text + ("。" if rng.random() < 0.3 else "")


# Words -> attribute values, for parse(). Longest match first, so "五角星" wins over "星".
def _lexicon() -> list[tuple[str, str, str, str]]:
    """(word, attribute, value, language) for every word the captions use, plus a few synonyms."""
    out: list[tuple[str, str, str, str]] = []
    for attr in ("colour", "shape", "size"):
        for value, ws in _EN[attr].items():
            out += [(w, attr, value, "en") for w in ws]
        for value, ws in _ZH[attr].items():
            out += [(w, attr, value, "zh") for w in ws]
    for value, ws in _ZH["position"].items():
        out += [(w, "position", value, "zh") for w in ws]
    for value, ws in _ZH["background"].items():
        for w in ws:
            for form in (
                w + "背景",
                w + "的背景",
                "背景是" + w,
                "背景为" + w,
                "背景" + w,
                "底色为" + w,
                "底色是" + w,
                "底色" + w,
                w + "底",
            ):
                out.append((form, "background", value, "zh"))
    for value in POSITIONS:
        out.append((value, "position", value, "en"))
    out += [
        ("centre", "position", "center", "en"),
        ("middle", "position", "center", "en"),
        ("centered", "position", "center", "en"),
        ("centred", "position", "center", "en"),
        ("upper", "position", "top", "en"),
        ("lower", "position", "bottom", "en"),
        ("high", "position", "top", "en"),
        ("low", "position", "bottom", "en"),
        ("grey", "colour", "gray", "en"),
        ("circular", "shape", "circle", "en"),
        ("round", "shape", "circle", "en"),
    ]
    return sorted(out, key=lambda t: -len(t[0]))


_LEXICON = _lexicon()
_BG_EN = re.compile(
    r"\b(white|gray|grey|black|beige|cream)\b\s+(?:plain\s+|flat\s+)?(?:background|backdrop)"
    r"|(?:background|backdrop)\s*(?:is|:|of)?\s*(?:a\s+|plain\s+)*\b(white|gray|grey|black|beige|cream)\b"
    r"|\bon\s+(white|gray|grey|black|beige|cream)\b"
    r"(?!\s+(?:circle|square|triangle|star|dis[ck]|box|shape|pentagram|five|round|dot))",
    re.IGNORECASE,
)
_BG_WORD = {"grey": "gray", "cream": "beige"}


def parse(prompt: str) -> dict[str, str]:
    """The toy attributes a prompt names (colour, shape, position, size, background), English or Chinese.

    It reads the words the toy captions use (and a few synonyms); an attribute not named is absent.
    The background is the colour word attached to "background"/"backdrop" (背景/底色); the shape's
    colour is the other one.

    Example:
        >>> parse("A big blue star at the top, on a black background.")
        {'colour': 'blue', 'shape': 'star', 'position': 'top', 'size': 'large', 'background': 'black'}
    """
    text = prompt.lower()
    found: dict[str, str] = {}
    m = _BG_EN.search(text)
    if m:
        word = next(g for g in m.groups() if g)
        found["background"] = _BG_WORD.get(word, word)
        text = text[: m.start()] + " " + text[m.end() :]
    for word, attr, value, lang in _LEXICON:
        if attr == "background" and lang == "en":
            continue
        if lang == "en":
            pat = re.compile(r"(?<![a-z])" + re.escape(word) + r"(?![a-z])")
            hit = pat.search(text)
        else:
            idx = text.find(word)
            hit = None if idx < 0 else idx
        if hit is None:
            continue
        if attr not in found:
            found[attr] = value
        # blank the word out so that shorter words inside it do not match again
        if lang == "en":
            text = pat.sub(" ", text, count=1)
        else:
            text = text.replace(word, " " * len(word), 1)
    order = ("colour", "shape", "position", "size", "background")
    return {k: found[k] for k in order if k in found}


# ---------------------------------------------------------------------------------------------------------
# Reading an image back
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Reading:
    """What :func:`read_image` saw: the attributes, and the features they were decided from."""

    background: str
    colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    area: float  # fraction of the image covered by the shape
    fill: float  # fraction of the shape's bounding box it fills
    centre: tuple[float, float]  # (x, y) of the shape's centroid, fractions of width and height
    colour_error: float  # RGB distance of the shape's median colour from the palette colour chosen

    def attributes(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in ("colour", "shape", "position", "size", "background")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nearest(
    rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], exclude: Iterable[str] = ()
) -> tuple[str, float]:
    best, dist = "", float("inf")
    for name, ref in palette.items():
        if name in exclude:
            continue
        d = float(np.linalg.norm(rgb - np.asarray(ref, dtype=np.float64)))
        if d < dist:
            best, dist = name, d
    return best, dist


# Half the RGB distance from each background to the nearest shape colour allowed on it (white on beige is
# the closest pair, 61 apart): a pixel further than that from the background belongs to the shape.
_THRESHOLDS = {
    b: 0.5 * min(float(np.linalg.norm(np.subtract(COLOURS[c], rgb))) for c in COLOURS if c != b)
    for b, rgb in BACKGROUNDS.items()
}

# (fill of the bounding box, centroid's offset below the box centre / box height) for each shape,
# computed from the geometry above, and how read_image weighs the two features.
_PROTOTYPES = {"circle": (0.785, 0.0), "square": (1.0, 0.0), "triangle": (0.5, 0.167), "star": (0.384, 0.05)}


def read_image(image: Any, threshold: float = 60.0) -> Reading:
    """Read background, shape colour, shape, position and size off a toy-world image.

    The background is the palette colour nearest the median of the border; shape pixels are those more
    than ``threshold`` (RGB distance) from it; their median colour gives the shape's colour, their
    centroid the position (centre when within 0.12 of the middle, else the dominant direction), their
    area the size, and how much of their bounding box they fill (plus how far their centroid sits below
    the box's centre) the shape. Accepts a PIL image, a numpy array (H, W, 3) uint8, or a path.

    Example:
        >>> r = read_image(render(Scene("triangle", "yellow", "bottom", "small", "gray"), 128, 128))
        >>> r.shape, r.position, r.size
        ('triangle', 'bottom', 'small')
    """
    from PIL import Image

    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image, dtype=np.float64)
    h, w = arr.shape[:2]
    b = max(2, min(h, w) // 32)
    border = np.concatenate(
        [
            arr[:b].reshape(-1, 3),
            arr[-b:].reshape(-1, 3),
            arr[:, :b].reshape(-1, 3),
            arr[:, -b:].reshape(-1, 3),
        ]
    )
    bg_rgb = np.median(border, axis=0)
    background, _ = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.linalg.norm(arr - bg_rgb, axis=2)
    mask = dist > min(threshold, _THRESHOLDS[background])
    area = float(mask.mean())
    if area < 0.003:
        return Reading(background, None, None, None, None, area, 0.0, (0.5, 0.5), 0.0)
    ys, xs = np.nonzero(mask)
    shape_rgb = np.median(arr[mask], axis=0)
    colour, colour_error = _nearest(shape_rgb, COLOURS)
    cx, cy = float(xs.mean()) / w, float(ys.mean()) / h
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        position = "center"
    elif abs(dx) * w >= abs(dy) * h:
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    bw, bh = max(x1 - x0 + 1, 1.0), max(y1 - y0 + 1, 1.0)
    fill = float(mask.sum()) / (bw * bh)
    offset = (float(ys.mean()) - (y0 + y1) / 2) / bh
    shape = min(
        _PROTOTYPES, key=lambda s: (fill - _PROTOTYPES[s][0]) ** 2 + (2.0 * (offset - _PROTOTYPES[s][1])) ** 2
    )
    size = "large" if area / (min(h, w) ** 2 / (h * w)) > 0.06 else "small"
    return Reading(background, colour, shape, position, size, area, fill, (cx, cy), colour_error)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One held-out prompt with the seed to draw it with and the attributes it names."""

    prompt: str
    seed: int
    lang: str
    expected: dict[str, str] = field(hash=False)
    width: int = 256
    height: int = 256


def eval_set(
    n: int = 240,
    seed: int = 1234,
    sizes: Sequence[tuple[int, int]] = ((256, 256),),
    split: str = "heldout",
) -> list[EvalItem]:
    """``n`` held-out prompt/seed pairs: half English, half Chinese (the same scenes in both languages),
    phrased with the held-out phrasings only, naming colour, shape, position and background.
    ``split="train"`` phrases the same kind of scenes with the training phrasings instead (new scenes and
    seeds, familiar wording): the gap between the two says how far the model generalises to other words.

    Example:
        >>> items = eval_set(4)
        >>> [i.lang for i in items], items[0].expected == items[1].expected
        (['en', 'zh', 'en', 'zh'], True)
    """
    rng = random.Random(seed)
    items: list[EvalItem] = []
    full = {a: 0.0 for a in ATTRIBUTES}
    full["size"] = 1.0
    for k in range((n + 1) // 2):
        scene = random_scene(rng)
        width, height = sizes[k % len(sizes)]
        expected = {a: getattr(scene, a) for a in ("colour", "shape", "position", "background")}
        for lang in ("en", "zh"):
            text = caption(scene, rng, lang=lang, drop=full, split=split)
            items.append(EvalItem(text, 10_000 + 2 * k, lang, expected, width, height))
    return items[:n]


def score(items: Sequence[EvalItem], images: Sequence[Any]) -> dict[str, Any]:
    """Adherence of ``images`` to ``items``: the fraction right per attribute, overall and per language.

    Example:
        >>> items = eval_set(2)
        >>> imgs = [render(Scene(size="large", **i.expected)) for i in items]
        >>> score(items, imgs)["all"]["colour"]
        1.0
    """
    rows = []
    for item, image in zip(items, images, strict=True):
        got = read_image(image).attributes()
        rows.append((item.lang, {a: float(got.get(a) == v) for a, v in item.expected.items()}))
    out: dict[str, Any] = {}
    for group in ("all", "en", "zh"):
        sel = [r for lang, r in rows if group in ("all", lang)]
        if not sel:
            continue
        out[group] = {
            a: round(sum(r[a] for r in sel if a in r) / max(1, sum(a in r for r in sel)), 4)
            for a in ("colour", "shape", "position", "background")
        }
        out[group]["all_four"] = round(sum(all(r.values()) for r in sel) / len(sel), 4)
        out[group]["n"] = len(sel)
    return out


# ---------------------------------------------------------------------------------------------------------
# Edits: one attribute of a scene changed, the instruction that asks for it, and how to judge the result
# (the toy edit model, ``toy-edit``, is trained by training/toy/train_edit.py on these)
# ---------------------------------------------------------------------------------------------------------

EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "position", "size", "background")

# Instructions per edit kind and split: {obj} is how the shape is referred to ("the circle", "it", "the red
# star"), {new} the new value's word. Held-out phrasings never appear in training.
_EN_EDIT = {
    "train": {
        "colour": [
            "make {obj} {new}",
            "turn {obj} {new}",
            "paint {obj} {new}",
            "recolor {obj} {new}",
            "colour {obj} {new}",
            "change the colour of {obj} to {new}",
            "change {obj} to {new}",
            "{obj} should be {new}",
            "make {obj} {new} instead",
        ],
        "shape": [
            "turn {obj} into a {new}",
            "make {obj} a {new}",
            "replace {obj} with a {new}",
            "change {obj} into a {new}",
            "change the shape to a {new}",
            "make it a {new} instead",
            "{obj} should be a {new}",
        ],
        "position": [
            "move {obj} {new}",
            "put {obj} {new}",
            "shift {obj} {new}",
            "place {obj} {new}",
            "{obj} goes {new}",
            "move it {new}",
        ],
        "size": [
            "make {obj} {new}",
            "{new} {obj}",
            "{obj} should be {new}",
        ],
        "background": [
            "change the background to {new}",
            "make the background {new}",
            "set the background to {new}",
            "use a {new} background",
            "replace the background with {new}",
            "put {obj} on a {new} background",
            "the background should be {new}",
        ],
    },
    "heldout": {
        "colour": ["give {obj} a {new} colour", "could you make {obj} {new}?", "switch {obj} over to {new}"],
        "shape": ["swap {obj} for a {new}", "draw a {new} in place of {obj}", "reshape {obj} as a {new}"],
        "position": ["relocate {obj} {new}", "drag {obj} over {new}", "reposition {obj} {new}"],
        "size": ["resize {obj}: {new}", "could you {new} {obj}?"],
        "background": ["swap the backdrop for a {new} one", "give the picture a {new} backdrop"],
    },
}
# More training phrasings (split "train+", train_edit.py --phrasings train+): the same kinds in other shapes of
# sentence, chiefly with the new value *before* the object ("use a star instead of the circle"), which the
# "train" phrasings never have (the new value always comes last there) and some held-out phrasings do. None of
# them is a held-out phrasing (tests/test_toy.py checks that no "train+" instruction fits a held-out template).
_EN_EDIT_MORE = {
    "colour": ["fill {obj} with {new}", "I want {obj} in {new}", "let {obj} be {new}"],
    "shape": [
        "use a {new} instead of {obj}",
        "I want a {new} rather than {obj}",
        "put a {new} where {obj} is",
        "a {new} instead of {obj}, please",
    ],
}
_ZH_EDIT_MORE = {
    "colour": ["把{obj}的颜色换成{new}", "使{obj}变成{new}", "{obj}的颜色应该是{new}"],
    "shape": ["拿{new}代替{obj}", "换一个{new}来代替{obj}", "以{new}取代{obj}"],
}
_EN_EDIT["train+"] = {k: v + _EN_EDIT_MORE.get(k, []) for k, v in _EN_EDIT["train"].items()}
_EN_EDIT_POSITION = {
    "left": ["to the left", "left", "to the left side", "over to the left"],
    "right": ["to the right", "right", "to the right side", "over to the right"],
    "top": ["to the top", "up to the top", "up", "to the top edge"],
    "bottom": ["to the bottom", "down to the bottom", "down", "to the bottom edge"],
    "center": ["to the center", "to the middle", "into the centre", "to the centre"],
}
# (train words, held-out words) for size edits, by the new size, in the form the template wants.
_EN_EDIT_SIZE = {
    "train": {
        "make": {"large": ["bigger", "larger", "big", "large"], "small": ["smaller", "small", "tiny"]},
        "verb": {"large": ["enlarge", "grow", "scale up"], "small": ["shrink", "scale down", "reduce"]},
    },
    "heldout": {
        "make": {"large": ["twice as big", "much bigger"], "small": ["half the size", "much smaller"]},
        "verb": {"large": ["blow up", "magnify"], "small": ["downsize", "make smaller"]},
    },
}
_EN_EDIT_SIZE["train+"] = _EN_EDIT_SIZE["train"]
_ZH_EDIT = {
    "train": {
        "colour": ["把{obj}改成{new}", "把{obj}变成{new}", "将{obj}涂成{new}", "{obj}换成{new}"],
        "shape": ["把{obj}变成{new}", "将{obj}改为{new}", "把{obj}换成{new}"],
        "position": ["把{obj}移到{new}", "将{obj}放到{new}", "把{obj}挪到{new}"],
        "size": ["把{obj}{new}", "将{obj}{new}"],
        "background": ["把背景换成{new}", "背景改成{new}", "把背景变成{new}", "将背景改为{new}"],
    },
    "heldout": {
        "colour": ["请把{obj}的颜色改为{new}", "让{obj}变为{new}"],
        "shape": ["用{new}替换{obj}", "请把{obj}画成{new}"],
        "position": ["请把{obj}移动到画面{new}", "让{obj}出现在{new}"],
        "size": ["请把{obj}稍微{new}一些"],
        "background": ["请将背景设为{new}", "背景请用{new}"],
    },
}
_ZH_EDIT_SIZE = {
    "train": {"large": ["变大", "放大"], "small": ["变小", "缩小"]},
    "heldout": {"large": ["调大"], "small": ["调小"]},
}
_ZH_EDIT["train+"] = {k: v + _ZH_EDIT_MORE.get(k, []) for k, v in _ZH_EDIT["train"].items()}
_ZH_EDIT_SIZE["train+"] = _ZH_EDIT_SIZE["train"]


def edit_target(scene: Scene, kind: str, rng: random.Random, value: str | None = None) -> Scene:
    """``scene`` with its ``kind`` attribute changed to ``value`` (or a random other value that the toy world
    allows: a shape colour never equals the background). The jitter of position and size is kept.

    Example:
        >>> s = Scene("circle", "red", "left", "large", "white")
        >>> edit_target(s, "colour", random.Random(0), "blue").colour
        'blue'
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; the toy world edits {', '.join(EDIT_KINDS)}")
    current = getattr(scene, kind)
    if value is None:
        allowed = {
            "colour": [c for c in COLOURS if c != scene.background],
            "shape": list(SHAPES),
            "position": list(POSITIONS),
            "size": list(SIZES),
            "background": [b for b in BACKGROUNDS if b != scene.colour],
        }[kind]
        value = rng.choice([v for v in allowed if v != current])
    fields = {**asdict(scene), kind: value}
    return Scene(**fields)


def _edit_object(scene: Scene, rng: random.Random, lang: str) -> str:
    if lang == "zh":
        shape = rng.choice(_ZH["shape"][scene.shape])
        r = rng.random()
        if r < 0.2:
            return "它"
        if r < 0.45:
            return rng.choice(_ZH["colour"][scene.colour]) + "的" + shape
        return shape
    shape = rng.choice(_EN["shape"][scene.shape])
    r = rng.random()
    if r < 0.2:
        return "it"
    if r < 0.3:
        return "the shape"
    if r < 0.5:
        return f"the {rng.choice(_EN['colour'][scene.colour])} {shape}"
    return f"the {shape}"


def edit_instruction(
    source: Scene, target: Scene, rng: random.Random, lang: str = "en", split: str = "train"
) -> str:
    """An instruction that turns ``source`` into ``target`` (which differ in one attribute), in English or
    Chinese; ``split="heldout"`` uses phrasings that training never sees, ``"train+"`` the training phrasings and
    more sentence shapes (the new value before the object, too).

    Example:
        >>> s = Scene("circle", "red", "left", "large", "white")
        >>> edit_instruction(s, edit_target(s, "colour", random.Random(0), "blue"), random.Random(1))
        'Turn the disc blue'
    """
    template, obj, word = _edit_parts(source, target, rng, lang, split)
    text = template.format(obj=obj, new=word)
    if lang == "en" and rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text


def _edit_parts(
    source: Scene, target: Scene, rng: random.Random, lang: str, split: str
) -> tuple[str, str, str]:
    """What :func:`edit_instruction` says, before it is put together: the phrasing (with ``{obj}`` and ``{new}``),
    the object's words and the new value's words, drawn in the order edit_instruction has always drawn them."""
    if split not in _EN_EDIT:
        raise ValueError(f"unknown phrasing split {split!r}; the splits: {', '.join(_EN_EDIT)}")
    changed = [k for k in EDIT_KINDS if getattr(source, k) != getattr(target, k)]
    if len(changed) != 1:
        raise ValueError(
            f"source and target must differ in one attribute, they differ in {changed or 'none'}"
        )
    kind = changed[0]
    new = getattr(target, kind)
    obj = _edit_object(source, rng, lang)
    if lang == "zh":
        if kind == "size":
            word = rng.choice(_ZH_EDIT_SIZE[split][new])
        elif kind == "background":
            word = rng.choice(_ZH["background"][new])
        else:
            word = rng.choice(_ZH[kind][new])
        return rng.choice(_ZH_EDIT[split][kind]), obj, word
    if kind == "size":
        template = rng.choice(_EN_EDIT[split]["size"])
        form = "verb" if template.startswith("{new}") or "you {new}" in template else "make"
        word = rng.choice(_EN_EDIT_SIZE[split][form][new])
    elif kind == "position":
        template = rng.choice(_EN_EDIT[split]["position"])
        word = rng.choice(_EN_EDIT_POSITION[new])
    else:
        template = rng.choice(_EN_EDIT[split][kind])
        word = rng.choice(_EN["background" if kind == "background" else kind][new])
    return template, obj, word


@dataclass(frozen=True)
class EditItem:
    """One held-out edit: the source scene, the instruction, the scene it should become, and the seed."""

    source: Scene
    target: Scene
    kind: str
    instruction: str
    lang: str
    seed: int
    width: int = 256
    height: int = 256


def edit_eval_set(
    n: int = 200,
    seed: int = 4321,
    sizes: Sequence[tuple[int, int]] = ((256, 256),),
    split: str = "heldout",
) -> list[EditItem]:
    """``n`` edits spread evenly over the edit kinds, half English and half Chinese, phrased with the held-out
    phrasings (``split="train"``: the training phrasings, on new scenes and seeds).

    Example:
        >>> items = edit_eval_set(10)
        >>> sorted({i.kind for i in items}) == sorted(EDIT_KINDS), {i.lang for i in items} == {"en", "zh"}
        (True, True)
    """
    rng = random.Random(seed)
    items: list[EditItem] = []
    for k in range(n):
        kind = EDIT_KINDS[k % len(EDIT_KINDS)]
        lang = "en" if (k // len(EDIT_KINDS)) % 2 == 0 else "zh"
        source = random_scene(rng)
        target = edit_target(source, kind, rng)
        text = edit_instruction(source, target, rng, lang=lang, split=split)
        width, height = sizes[k % len(sizes)]
        items.append(EditItem(source, target, kind, text, lang, 20_000 + k, width, height))
    return items


def score_edits(items: Sequence[EditItem], images: Sequence[Any]) -> dict[str, Any]:
    """How well ``images`` carry out ``items``: per edit kind and overall, the share where the asked-for
    attribute reads as the new value (``changed``), where every other attribute reads as before (``kept``),
    both (``right``), and the mean RGB difference from the ideal result (``mae``, 0-255) over the pixels that
    are background in both the source and the target (``mae_rest``: what the edit should leave alone).

    Example:
        >>> items = edit_eval_set(5)
        >>> score_edits(items, [render(i.target, i.width, i.height) for i in items])["all"]["right"]
        1.0
    """
    rows: list[tuple[str, dict[str, float]]] = []
    for item, image in zip(items, images, strict=True):
        if hasattr(image, "convert"):
            image = image.convert("RGB")
        arr = np.asarray(image, dtype=np.float64)
        h, w = arr.shape[:2]
        got = read_image(arr).attributes()
        want = item.target.attributes()
        changed = float(got[item.kind] == want[item.kind])
        kept = float(all(got[a] == want[a] for a in ATTRIBUTES if a != item.kind))
        ideal = np.asarray(render(item.target, w, h), dtype=np.float64)
        src = np.asarray(render(item.source, w, h), dtype=np.float64)
        rest = (np.abs(ideal - ideal[0, 0]).sum(-1) < 1) & (np.abs(src - src[0, 0]).sum(-1) < 1)
        diff = np.abs(arr - ideal).mean(-1)
        rows.append(
            (
                item.kind,
                {
                    "changed": changed,
                    "kept": kept,
                    "right": changed * kept,
                    "mae": float(diff.mean()),
                    "mae_rest": float(diff[rest].mean()) if rest.any() else 0.0,
                },
            )
        )
    out: dict[str, Any] = {}
    for group in ("all", *EDIT_KINDS):
        sel = [r for kind, r in rows if group in ("all", kind)]
        if sel:
            out[group] = {k: round(sum(r[k] for r in sel) / len(sel), 4) for k in sel[0]}
            out[group]["n"] = len(sel)
    return out
