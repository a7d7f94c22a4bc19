"""Procedural images with question / answer pairs for the demo model (seeded, no files, no network).

Three kinds of scene, drawn with OpenCV on varied backgrounds (tinted gradients, Gaussian noise):
- "single": one shape (colour, shape, big/small, at the left/right/top/bottom);
- "count": 1-5 small shapes of one colour and shape;
- "word": a short printed word (cv2.putText) in one colour.
Every scene has a caption and one question per applicable question type. Answers are one word.
`Sample.image` is an RGB uint8 array of IMAGE_SIZE x IMAGE_SIZE (what the vision tower sees).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 112

COLOURS = {  # name -> RGB
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("left", "right", "top", "bottom")
SIZES = ("big", "small")
COUNTS = (1, 2, 3, 4, 5)
WORDS = ("cat", "dog", "sun", "car", "hat", "box", "bird", "fish", "tree", "book", "milk", "ship")
SHAPE_CLASS = {name: i + 1 for i, name in enumerate(SHAPES)}
TEXT_CLASS = len(SHAPES) + 1
QUESTION_TYPES = ("colour", "shape", "position", "size", "count", "word")

QUESTIONS = {
    "colour": ("What colour is the shape?", "What color is the object?", "Which colour is it?"),
    "shape": ("What shape is it?", "What shape is in the image?", "Which shape do you see?"),
    "position": ("Where is the shape?", "Where is the object: left, right, top or bottom?"),
    "size": ("Is the shape big or small?", "How big is the object?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),
    "word": ("What word is written?", "What does the text say?", "Read the word in the image."),
}
SCENE_QUESTIONS = {
    "single": ("colour", "shape", "position", "size"),
    "count": ("count", "colour", "shape"),
    "word": ("word", "colour"),
}
ANSWER_SET = {
    "colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS, "size": SIZES,
    "count": tuple(str(c) for c in COUNTS), "word": WORDS,
}
CAPTION_PROMPT = "Describe the image."


@dataclass
class Scene:
    kind: str  # single | count | word
    colour: str
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    count: int | None = None
    word: str | None = None
    image: np.ndarray = field(default=None, repr=False)  # RGB uint8 [S, S, 3]
    mask: np.ndarray = field(default=None, repr=False)  # uint8 [S, S] pixel classes (dense training targets)
    centres: list = field(default_factory=list, repr=False)  # shape centres (x, y) in pixels

    def answer(self, qtype: str) -> str:
        if qtype == "count":
            return str(self.count)
        return str(getattr(self, qtype))

    @property
    def caption(self) -> str:
        if self.kind == "single":
            return f"a {self.size} {self.colour} {self.shape} at the {self.position}"
        if self.kind == "count":
            return f"{self.count} {self.colour} {self.shape}" + ("s" if self.count != 1 else "")
        return f"the word {self.word} in {self.colour}"

    def questions(self) -> tuple[str, ...]:
        return SCENE_QUESTIONS[self.kind]


@dataclass
class QA:
    scene: Scene
    qtype: str
    question: str
    answer: str


# ---- drawing -----------------------------------------------------------------------------------


def _background(rng: random.Random, nrng: np.random.Generator, s: int) -> np.ndarray:
    """A muted, tinted two-colour gradient with noise: never close to a saturated object colour."""
    def muted():
        base = rng.choice((rng.uniform(25, 90), rng.uniform(150, 235)))
        return np.array([base + rng.uniform(-18, 18) for _ in range(3)], dtype=np.float32)

    a, b = muted(), muted() if rng.random() < 0.6 else None
    if b is None:
        img = np.broadcast_to(a, (s, s, 3)).astype(np.float32)
    else:
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
        t = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        img = a * (1 - t) + b * t
    sigma = rng.choice((0.0, 3.0, 6.0, 10.0))
    if sigma:
        img = img + nrng.normal(0, sigma, img.shape).astype(np.float32)
    return np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def _jitter(rgb, rng: random.Random) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.uniform(-20, 20), 0, 255)) for c in rgb)


def _draw_shape(img: np.ndarray, shape: str, cx: float, cy: float, r: float, colour, rng: random.Random,
                aa: int | None = None) -> None:
    import cv2

    col = tuple(int(c) for c in colour)
    aa = cv2.LINE_AA if aa is None else aa
    if shape == "circle":
        cv2.circle(img, (int(round(cx * 16)), int(round(cy * 16))), int(round(r * 16)), col, -1, aa, 4)
        return
    if shape == "square":
        h = r * 0.85
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + r * 0.18) for x, y in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    else:
        raise ValueError(shape)
    arr = np.array([[int(round(x * 16)), int(round(y * 16))] for x, y in pts], dtype=np.int32)
    cv2.fillPoly(img, [arr], col, aa, 4)


def _pick_colour(rng: random.Random) -> str:
    return rng.choice(tuple(COLOURS))


def make_scene(rng: random.Random, kind: str | None = None, s: int = IMAGE_SIZE) -> Scene:
    import cv2

    nrng = np.random.default_rng(rng.getrandbits(32))
    kind = kind or rng.choices(("single", "count", "word"), weights=(4, 3, 2))[0]
    img = _background(rng, nrng, s)
    mask = np.zeros((s, s), np.uint8)  # per-pixel class (0 background, SHAPE_CLASS, TEXT_CLASS): training targets
    colour = _pick_colour(rng)
    rgb = _jitter(COLOURS[colour], rng)
    if kind == "single":
        shape, pos, size = rng.choice(SHAPES), rng.choice(POSITIONS), rng.choice(SIZES)
        r = s * (rng.uniform(0.19, 0.24) if size == "big" else rng.uniform(0.07, 0.10))
        along = rng.uniform(0.38, 0.62) * s
        off = rng.uniform(0.05, 0.09) * s + r  # distance of the centre from the near edge
        off = min(off, 0.36 * s)
        cx, cy = {"left": (off, along), "right": (s - off, along), "top": (along, off), "bottom": (along, s - off)}[pos]
        _draw_shape(img, shape, cx, cy, r, rgb, rng)
        _draw_shape(mask, shape, cx, cy, r, (SHAPE_CLASS[shape],), rng, cv2.LINE_8)
        centres = [(cx, cy)]
        scene = Scene("single", colour, shape=shape, position=pos, size=size)
    elif kind == "count":
        shape, n = rng.choice(SHAPES), rng.choice(COUNTS)
        r = s * rng.uniform(0.065, 0.085)
        centres: list[tuple[float, float]] = []
        while len(centres) < n:
            c = (rng.uniform(r + 3, s - r - 3), rng.uniform(r + 3, s - r - 3))
            if all(math.hypot(c[0] - o[0], c[1] - o[1]) > 2.3 * r for o in centres):
                centres.append(c)
        for cx, cy in centres:
            rr = r * rng.uniform(0.9, 1.1)
            _draw_shape(img, shape, cx, cy, rr, rgb, rng)
            _draw_shape(mask, shape, cx, cy, rr, (SHAPE_CLASS[shape],), rng, cv2.LINE_8)
        scene = Scene("count", colour, shape=shape, count=n)
    else:
        word = rng.choice(WORDS)
        font = rng.choice((cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX))
        thick = rng.choice((2, 2, 3))
        scale = rng.uniform(0.75, 1.0) * (4.0 / max(len(word), 3)) ** 0.3
        (tw, th), base = cv2.getTextSize(word, font, scale, thick)
        while tw > s - 8:
            scale *= 0.9
            (tw, th), base = cv2.getTextSize(word, font, scale, thick)
        x = rng.uniform(4, max(4.0, s - 4 - tw))
        y = rng.uniform(th + 4, s - base - 4)
        cv2.putText(img, word, (int(x), int(y)), font, scale, tuple(int(c) for c in rgb), thick, cv2.LINE_AA)
        cv2.putText(mask, word, (int(x), int(y)), font, scale, (TEXT_CLASS,), thick, cv2.LINE_8)
        centres = []
        scene = Scene("word", colour, word=word)
    scene.image = img
    scene.mask = np.where(mask > 0, TEXT_CLASS, 0).astype(np.uint8) if kind == "word" else mask
    scene.centres = centres
    return scene


def make_qa(rng: random.Random, qtype: str | None = None) -> QA:
    """One scene and one question about it. `qtype` forces the question type (and a fitting scene)."""
    if qtype is None:
        scene = make_scene(rng)
        qtype = rng.choice(scene.questions())
    else:
        kinds = [k for k, qs in SCENE_QUESTIONS.items() if qtype in qs]
        scene = make_scene(rng, rng.choice(kinds))
    return QA(scene, qtype, rng.choice(QUESTIONS[qtype]), scene.answer(qtype))


HELD_OUT_SEED = 10_000_019  # training draws from random.Random(seed) with small seeds (default 0)


def held_out_set(n_per_type: int = 100, seed: int = HELD_OUT_SEED) -> list[QA]:
    """The evaluation set: n_per_type questions of each type (seed disjoint from training's)."""
    rng = random.Random(seed)
    return [make_qa(rng, qt) for _ in range(n_per_type) for qt in QUESTION_TYPES]


def normalize_answer(text: str) -> str:
    t = text.strip().lower().strip(" .!?,:;\"'")
    t = t.replace("color", "colour")
    words = t.split()
    return words[0] if len(words) == 1 else t


def is_correct(generated: str, answer: str) -> bool:
    return normalize_answer(generated) == answer.lower()


# ---- bundled sample images (vila_edge/demo/assets) ---------------------------------------------

SAMPLE_SEED = 20_261_127


def sample_scenes() -> list[tuple[str, Scene]]:
    """The bundled samples: (file name, scene), drawn from their own seed: two single shapes, a count, a word."""
    rng = random.Random(SAMPLE_SEED)
    out = []
    for i, kind in enumerate(("single", "count", "word", "single"), start=1):
        out.append((f"sample_{i}_{kind}.png", make_scene(rng, kind)))
    return out


def write_sample_assets(folder) -> list[dict]:
    """Write the sample PNGs and samples.json (questions with expected answers) into `folder`."""
    import json
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for name, scene in sample_scenes():
        Image.fromarray(scene.image).save(folder / name, optimize=True)
        index.append({"file": name, "caption": scene.caption,
                      "questions": [{"type": q, "question": QUESTIONS[q][0], "answer": scene.answer(q)}
                                    for q in scene.questions()]})
    (folder / "samples.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
