"""Shapes: a small, built-in, synthetic image data set for all three tasks.

Every image shows a noisy, textured background with one to ``max_shapes`` coloured geometric
shapes (circle, square, triangle, star, cross, hexagon) of varied size, colour, rotation and
position; shapes drawn later occlude earlier ones.  One renderer produces, for each image, the
annotations of every task at once:

* classification: the class of the dominant shape (largest visible area after occlusion),
* detection: a pixel box and a class id for every visible shape,
* segmentation: a per-pixel class map (0 = background, ``c + 1`` for class ``c``).

Why it exists: tests, examples and smoke runs of the A-FAN training code need data that is
available offline, costs nothing to store, renders in milliseconds on a CPU, and is neither
trivial nor unlearnable.  With the defaults, a small CNN trained for about a minute on two CPU
cores reaches a clearly-above-chance but clearly-below-perfect accuracy at 32x32 pixels.

Determinism: item ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed,
split_id(s), i])`` alone, so random access gives the same sample whatever the order of access
or the number of DataLoader workers, and the splits are independent streams.  All scene
parameters are drawn in image-relative units before any pixel is touched, so the same item at
another ``image_size`` shows the same scene at another resolution (only the pixel noise and,
rarely, which tiny slivers count as visible differ).

Rasterisation is vectorised numpy: every shape is a union of convex polygons, and a sample point
is inside a convex polygon when it lies on the inner side of all its edges (half-plane tests in
the shape's own rotated frame).  Each pixel is sampled ``supersample**2`` times, which gives
anti-aliased edges and a per-pixel owner (background or one shape) by majority of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPE_CLASSES",
    "NUM_CLASSES",
    "SPLITS",
    "TASKS",
    "ShapesSample",
    "ShapesStyle",
    "render_sample",
    "ShapesDataset",
]

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
NUM_CLASSES = len(SHAPE_CLASSES)

# Fixed ids, so that adding a split later never changes the images of the existing ones.
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SPLITS: tuple[str, ...] = tuple(_SPLIT_IDS)
TASKS: tuple[str, ...] = ("classification", "detection", "segmentation")

MIN_IMAGE_SIZE = 16  # below this, a star and a hexagon are a handful of indistinct pixels


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# Difficulty knobs.  The defaults are tuned so that the classification task at 32x32 is
# learnable but not trivial: a 3-layer CNN trained for about a minute on two CPU cores on
# 5,000 images reaches roughly 45-65% validation accuracy (chance: 1/6), depending on the
# optimiser.  Measured: fixed per-pixel noise is what hurts a small network most (it memorises
# each image's noise instead of learning outlines), so the noise is mild and most of the
# difficulty comes from the distractors, the textured background and the random colours and
# rotations.
@dataclass(frozen=True)
class ShapesStyle:
    """The difficulty knobs of the renderer, checked once when the style is made."""

    noise_std: float = 0.03  # std of the per-pixel Gaussian noise, on a [0, 1] intensity scale
    # Equal-area radius of the main shape, as a fraction of the image side.
    size_range: tuple[float, float] = (0.22, 0.36)
    # Radius of every further (distractor) shape, relative to the main shape's radius.
    distractor_scale: tuple[float, float] = (0.25, 0.5)
    texture: float = 0.1  # largest amplitude of the background stripes
    min_contrast: float = 0.5  # least RGB distance of a shape's colour to what lies around it
    min_visible: float = 0.3  # least visible area of a shape, as a fraction of its full area
    supersample: int = 2  # samples per pixel along each axis

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_range", tuple(self.size_range))
        object.__setattr__(self, "distractor_scale", tuple(self.distractor_scale))
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std={self.noise_std!r} is not valid; use a number >= 0")
        low, high = self.size_range if len(self.size_range) == 2 else (0, -1)
        if not 0 < low <= high <= 0.5:
            raise ValueError(
                f"size_range={self.size_range!r} is not valid; use (low, high) with 0 < low <= high <= 0.5"
            )
        low, high = self.distractor_scale if len(self.distractor_scale) == 2 else (0, -1)
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"distractor_scale={self.distractor_scale!r} is not valid; use (low, high) with "
                "0 < low <= high <= 1"
            )
        if not self.texture >= 0:
            raise ValueError(f"texture={self.texture!r} is not valid; use a number >= 0")
        if not 0 <= self.min_contrast <= 1:
            raise ValueError(f"min_contrast={self.min_contrast!r} is not valid; use a number in [0, 1]")
        if not 0 <= self.min_visible < 1:
            raise ValueError(f"min_visible={self.min_visible!r} is not valid; use a number in [0, 1)")
        if not _is_int(self.supersample) or self.supersample < 1:
            raise ValueError(f"supersample={self.supersample!r} is not valid; use an integer >= 1")

# Per-task defaults for the data set: detection and segmentation need room for several
# shapes, classification is meant to be quick.
_DEFAULT_IMAGE_SIZE = {"classification": 32, "detection": 64, "segmentation": 64}
_DEFAULT_SPLIT_SIZE = {"train": 5000, "val": 1000, "test": 1000}


# --------------------------------------------------------------------------------------------
# Shape geometry: every class is a union of convex polygons in a unit frame.


def _regular_polygon(n: int, radius: float = 1.0) -> np.ndarray:
    """Vertices [n, 2] of a regular n-gon, counter-clockwise, first vertex pointing up."""
    angles = math.pi / 2 + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star_kites(points: int = 5, inner: float = 0.45) -> list[np.ndarray]:
    """A star as ``points`` convex kites (centre, inner vertex, tip, next inner vertex)."""
    kites = []
    for i in range(points):
        tip = math.pi / 2 + 2 * math.pi * i / points
        half = math.pi / points
        kites.append(
            np.array(
                [
                    [0.0, 0.0],
                    [inner * math.cos(tip - half), inner * math.sin(tip - half)],
                    [math.cos(tip), math.sin(tip)],
                    [inner * math.cos(tip + half), inner * math.sin(tip + half)],
                ]
            )
        )
    return kites


def _cross_bars(half_width: float = 0.33) -> list[np.ndarray]:
    """A plus sign as two overlapping rectangles (the union is not convex, each bar is)."""
    w = half_width
    horizontal = np.array([[-1.0, -w], [1.0, -w], [1.0, w], [-1.0, w]])
    vertical = np.array([[-w, -1.0], [w, -1.0], [w, 1.0], [-w, 1.0]])
    return [horizontal, vertical]


def _half_planes(pieces: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Convex pieces (CCW vertices) -> outward edge normals [P, E, 2] and offsets [P, E].

    A point ``p`` is inside piece ``j`` when ``normals[j] @ p <= offsets[j]`` for every edge.
    """
    normals, offsets = [], []
    for vertices in pieces:
        edges = np.roll(vertices, -1, axis=0) - vertices
        outward = np.stack([edges[:, 1], -edges[:, 0]], axis=1)  # right of a CCW edge
        normals.append(outward)
        offsets.append(np.einsum("ed,ed->e", outward, vertices))
    return np.stack(normals), np.stack(offsets)


def _inside(normals: np.ndarray, offsets: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Boolean [N]: which of ``points`` [N, 2] (unit frame) lie inside the union of pieces."""
    pieces, edges, _ = normals.shape
    side = points @ normals.reshape(-1, 2).T  # [N, P*E]: one matrix product for all edges
    within = side <= offsets.reshape(-1)
    return within.reshape(-1, pieces, edges).all(axis=2).any(axis=1)


def _unit_area(normals: np.ndarray, offsets: np.ndarray, resolution: int = 400) -> float:
    """Area of a unit-frame shape, measured on a fine grid (pieces may overlap, e.g. the cross)."""
    ticks = (np.arange(resolution) + 0.5) / resolution * 2.2 - 1.1
    xx, yy = np.meshgrid(ticks, ticks)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1)
    return float(_inside(normals, offsets, points).mean()) * 2.2**2


@dataclass(frozen=True)
class _ShapeGeometry:
    normals: np.ndarray  # [P, E, 2]
    offsets: np.ndarray  # [P, E]
    scale: float  # unit frame -> equal-area radius 1: every class has area pi * radius**2


def _build_geometry() -> tuple[_ShapeGeometry, ...]:
    pieces = {
        "circle": [_regular_polygon(32)],  # 32 sides: < 0.2 px from a true circle at 128 px
        "square": [_regular_polygon(4)],
        "triangle": [_regular_polygon(3)],
        "star": _star_kites(),
        "cross": _cross_bars(),
        "hexagon": [_regular_polygon(6)],
    }
    geometry = []
    for name in SHAPE_CLASSES:
        normals, offsets = _half_planes(pieces[name])
        # Equal areas keep the classes balanced as "dominant shape": otherwise a circle would
        # out-size a star of the same outer radius and win the label far more often.
        scale = math.sqrt(math.pi / _unit_area(normals, offsets))
        geometry.append(_ShapeGeometry(normals, offsets, scale))
    return tuple(geometry)


_GEOMETRY = _build_geometry()


# --------------------------------------------------------------------------------------------
# Scene description, drawn in image-relative coordinates (x, y in [0, 1], y down).


@dataclass(frozen=True)
class _Background:
    colour0: np.ndarray  # [3] colour at one end of the gradient
    colour1: np.ndarray  # [3] colour at the other end
    direction: np.ndarray  # [2] unit vector of the gradient
    stripe_freq: float  # cycles per image side
    stripe_dir: np.ndarray  # [2] unit vector across the stripes
    stripe_phase: float
    stripe_colour: np.ndarray  # [3] signed amplitude per channel

    def colour_at(self, x: float, y: float) -> np.ndarray:
        """The gradient colour (without stripes and noise) at one point."""
        return self.colour0 + (self.colour1 - self.colour0) * self._ramp(x, y)

    def _ramp(self, x, y):
        # Projection onto the direction, mapped so that the unit square spans [0, 1].
        dx, dy = self.direction
        low = min(0.0, dx) + min(0.0, dy)
        high = max(0.0, dx) + max(0.0, dy)
        return (x * dx + y * dy - low) / (high - low)


@dataclass(frozen=True)
class _Shape:
    cls: int
    cx: float
    cy: float
    radius: float  # equal-area radius
    angle: float
    colour: np.ndarray  # [3]


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0.0, 2 * math.pi)
    return np.array([math.cos(angle), math.sin(angle)])


def _draw_background(rng: np.random.Generator, texture: float) -> _Background:
    return _Background(
        colour0=rng.uniform(0.0, 1.0, size=3),
        colour1=rng.uniform(0.0, 1.0, size=3),
        direction=_unit_vector(rng),
        stripe_freq=rng.uniform(1.0, 4.0),
        stripe_dir=_unit_vector(rng),
        stripe_phase=rng.uniform(0.0, 2 * math.pi),
        stripe_colour=texture * rng.uniform(-1.0, 1.0, size=3),
    )


def _pick_colour(rng: np.random.Generator, avoid: list[np.ndarray], min_contrast: float):
    """A random colour at least ``min_contrast`` away from every colour in ``avoid``.

    A fixed number of candidates is drawn every time so that the random stream (and hence
    every later draw) does not depend on how many candidates were rejected.
    """
    candidates = rng.uniform(0.0, 1.0, size=(16, 3))
    distance = np.min(
        [np.linalg.norm(candidates - colour, axis=1) for colour in avoid], axis=0
    )
    good = np.flatnonzero(distance >= min_contrast)
    return candidates[good[0]] if good.size else candidates[np.argmax(distance)]


def _draw_shapes(
    rng: np.random.Generator,
    background: _Background,
    max_shapes: int,
    size_range: tuple[float, float],
    distractor_scale: tuple[float, float],
    min_contrast: float,
) -> list[_Shape]:
    """The shapes of one scene, in painting order (later ones occlude earlier ones).

    The first shape drawn is the main one, of radius ``size_range``; the others are smaller
    distractors.  The main shape is painted last, on top: it is then nearly always the dominant
    shape, so the classification label rarely hinges on a subtle comparison of areas, while
    the distractors still hide each other and appear at other scales for detection.
    """
    shapes: list[_Shape] = []
    main_radius = rng.uniform(*size_range)
    for k in range(rng.integers(1, max_shapes + 1)):
        radius = main_radius if k == 0 else main_radius * rng.uniform(*distractor_scale)
        # Centres keep at least about half of a shape inside the frame.
        margin = 0.6 * radius
        cx, cy = rng.uniform(margin, 1.0 - margin, size=2)
        # The colour must stand out from the local background and from the shapes already
        # drawn, or two overlapping shapes would merge into one blob of the wrong outline.
        avoid = [background.colour_at(cx, cy)] + [s.colour for s in shapes]
        shapes.append(
            _Shape(
                cls=int(rng.integers(NUM_CLASSES)),
                cx=float(cx),
                cy=float(cy),
                radius=float(radius),
                angle=float(rng.uniform(0.0, 2 * math.pi)),
                colour=_pick_colour(rng, avoid, min_contrast),
            )
        )
    return shapes[1:] + shapes[:1]


# --------------------------------------------------------------------------------------------
# Rasterisation.


def _sample_ticks(image_size: int, supersample: int) -> np.ndarray:
    """Relative coordinates of the sample points along one axis (sub-pixel centres)."""
    n = image_size * supersample
    return (np.arange(n) + 0.5) / n


def _paint_owner(shapes: Sequence[_Shape], image_size: int, supersample: int) -> np.ndarray:
    """Per sample point: 0 for background, k + 1 for ``shapes[k]``; later shapes win."""
    ticks = _sample_ticks(image_size, supersample)
    owner = np.zeros((ticks.size, ticks.size), dtype=np.int8)
    for k, shape in enumerate(shapes):
        geometry = _GEOMETRY[shape.cls]
        extent = shape.radius * geometry.scale  # every vertex lies within this distance
        # Only test the sample points in the shape's bounding square: cost ~ shape area.
        x0, x1 = np.searchsorted(ticks, [shape.cx - extent, shape.cx + extent])
        y0, y1 = np.searchsorted(ticks, [shape.cy - extent, shape.cy + extent])
        if x0 >= x1 or y0 >= y1:
            continue
        xx, yy = np.meshgrid(ticks[x0:x1] - shape.cx, ticks[y0:y1] - shape.cy)
        # Into the shape's frame: rotate by -angle, divide by the size.
        cos, sin = math.cos(shape.angle), math.sin(shape.angle)
        local = np.stack([cos * xx + sin * yy, -sin * xx + cos * yy], axis=-1) / extent
        inside = _inside(geometry.normals, geometry.offsets, local.reshape(-1, 2))
        block = owner[y0:y1, x0:x1]
        block[inside.reshape(block.shape)] = k + 1
    return owner


def _coverage(owner: np.ndarray, count: int, image_size: int, supersample: int) -> np.ndarray:
    """Fraction [count, H, W] of each pixel's samples owned by background (0) or shape k."""
    s = supersample
    # Group the samples by pixel, then count owners per pixel in one bincount.
    by_pixel = owner.reshape(image_size, s, image_size, s).transpose(0, 2, 1, 3)
    pixel = np.arange(image_size * image_size).repeat(s * s)
    counts = np.bincount(pixel * count + by_pixel.ravel(), minlength=image_size**2 * count)
    return counts.reshape(image_size, image_size, count).transpose(2, 0, 1) / (s * s)


def _paint_background(background: _Background, image_size: int) -> np.ndarray:
    """Gradient plus stripes, float [3, H, W] (may leave [0, 1] before the final clip)."""
    ticks = (np.arange(image_size) + 0.5) / image_size
    xx, yy = np.meshgrid(ticks, ticks)
    ramp = background._ramp(xx, yy)
    image = background.colour0[:, None, None] + (
        background.colour1 - background.colour0
    )[:, None, None] * ramp
    sx, sy = background.stripe_dir
    wave = np.sin(2 * math.pi * background.stripe_freq * (xx * sx + yy * sy) + background.stripe_phase)
    return image + background.stripe_colour[:, None, None] * wave


def _visible_shapes(
    shapes: list[_Shape], image_size: int, supersample: int, min_visible: float
) -> tuple[list[_Shape], np.ndarray]:
    """Drop shapes that end up (almost) hidden; return the survivors and their coverage.

    Removing a shape never hides another one, so the loop ends after a few passes at most.
    Dropping (rather than keeping tiny slivers) keeps image, mask and boxes consistent: every
    shape that is painted has a box, and every box has a reasonable amount of its shape.
    """
    while True:
        owner = _paint_owner(shapes, image_size, supersample)
        coverage = _coverage(owner, len(shapes) + 1, image_size, supersample)
        pixel_owner = coverage.argmax(axis=0)
        visible = np.bincount(pixel_owner.ravel(), minlength=len(shapes) + 1)[1:]
        full = np.array([math.pi * (s.radius * image_size) ** 2 for s in shapes])
        keep = visible >= np.maximum(min_visible * full, 1.0)
        if keep.all():
            return shapes, coverage
        shapes = [s for s, k in zip(shapes, keep) if k]


# --------------------------------------------------------------------------------------------
# Public API.


@dataclass
class ShapesSample:
    """One rendered image with the annotations of all three tasks.

    ``boxes`` are ``x1, y1, x2, y2`` in pixels, pixel ``j`` covering ``[j, j + 1)``: a box is
    the tight extent of the shape's pixels in ``mask``.  ``labels`` are class ids
    ``0..C-1`` (the detection data set adds 1, keeping 0 for background).
    """

    image: np.ndarray  # float32 [3, H, W] in [0, 1]
    label: int  # class of the dominant shape, 0..C-1
    boxes: np.ndarray  # float32 [K, 4]
    labels: np.ndarray  # int64 [K]
    mask: np.ndarray  # int64 [H, W]: 0 background, c + 1 for class c


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _check_render_args(seed, split, image_size, max_shapes) -> None:
    """Raise ValueError naming the bad argument and what it may be."""
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r} is not valid; use an integer >= 0")
    _check_choice("split", split, SPLITS)
    if not _is_int(image_size) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size!r} is too small; use an integer >= {MIN_IMAGE_SIZE}")
    if not _is_int(max_shapes) or max_shapes < 1:
        raise ValueError(f"max_shapes={max_shapes!r} is not valid; use an integer >= 1")


def render_sample(
    seed: int,
    split: str,
    index: int,
    *,
    image_size: int = 32,
    max_shapes: int = 3,
    style: ShapesStyle = ShapesStyle(),
) -> ShapesSample:
    """Render item ``index`` of ``split``; the result depends only on the arguments.

    ``style`` holds the difficulty knobs: ``size_range`` bounds the equal-area radius of a
    shape (fraction of the image side), ``texture`` the amplitude of the background stripes,
    ``min_contrast`` the RGB distance of a shape's colour from its local background and from
    earlier shapes, ``min_visible`` the fraction of its area a shape must keep visible (else
    it is removed from the scene).
    """
    _check_render_args(seed, split, image_size, max_shapes)
    if index < 0:
        raise ValueError(f"index={index!r} is not valid; use an integer >= 0")
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])
    background = _draw_background(rng, style.texture)
    shapes: list[_Shape] = []
    # A scene whose every shape is hidden (hardly possible with sane sizes) is drawn again.
    for _ in range(100):
        drawn = _draw_shapes(
            rng, background, max_shapes, style.size_range, style.distractor_scale, style.min_contrast
        )
        shapes, coverage = _visible_shapes(drawn, image_size, style.supersample, style.min_visible)
        if shapes:
            break
    else:  # pragma: no cover - needs absurd settings
        raise RuntimeError(f"could not place a visible shape at image_size={image_size}")

    colours = np.stack([np.zeros(3)] + [s.colour for s in shapes])  # row 0 unused
    image = coverage[0] * _paint_background(background, image_size)
    image += np.einsum("khw,kc->chw", coverage[1:], colours[1:])
    image += style.noise_std * rng.standard_normal(image.shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)

    owner = coverage.argmax(axis=0)  # 0 background, k + 1 for shapes[k]
    classes = np.array([s.cls for s in shapes], dtype=np.int64)
    mask = np.concatenate([[0], classes + 1])[owner].astype(np.int64)
    boxes = np.zeros((len(shapes), 4), dtype=np.float32)
    for k in range(len(shapes)):
        rows = np.flatnonzero((owner == k + 1).any(axis=1))
        cols = np.flatnonzero((owner == k + 1).any(axis=0))
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    # Dominant class: largest visible area; with two shapes of one class their areas add up,
    # which is what the mask shows.  Ties go to the lower class id.
    area = np.bincount(mask.ravel(), minlength=NUM_CLASSES + 1)[1:]
    return ShapesSample(image=image, label=int(area.argmax()), boxes=boxes, labels=classes, mask=mask)


class ShapesDataset(Dataset):
    """The Shapes data set for one task and split, rendered on the fly (nothing is stored).

    ``__getitem__`` returns

    * ``"classification"``: ``(image, label)`` with ``label`` an int in ``0..C-1``;
    * ``"detection"``: ``(image, {"boxes": FloatTensor[K, 4] xyxy pixels,
      "labels": Int64Tensor[K] in 1..C})`` -- 0 is background, as torchvision's detectors expect;
    * ``"segmentation"``: ``(image, Int64Tensor[H, W])`` with 0 background, ``c + 1`` class c.

    ``image`` is a float32 tensor [3, H, W] in [0, 1].  ``transform``, if given, is called on
    the image tensor only (targets are untouched), so use it for photometric changes such as
    normalisation, not for flips or crops that would move the boxes or the mask.

    ``size`` and ``image_size`` default per split (train 5000, val/test 1000) and per task
    (32 px for classification, 64 px otherwise).  The difficulty knobs are those of
    :func:`render_sample`, given as a :class:`ShapesStyle`. ``cache=True`` keeps every
    rendered sample in memory for the next epoch.
    """

    def __init__(
        self,
        task: str,
        split: str = "train",
        size: Optional[int] = None,
        image_size: Optional[int] = None,
        seed: int = 0,
        max_shapes: int = 3,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        style: Optional[ShapesStyle] = None,
        cache: bool = False,
    ) -> None:
        _check_choice("task", task, TASKS)
        _check_choice("split", split, SPLITS)
        size = _DEFAULT_SPLIT_SIZE[split] if size is None else size
        if not _is_int(size) or size <= 0:
            raise ValueError(f"size={size!r} is not valid; use an integer > 0 (images in the split)")
        image_size = _DEFAULT_IMAGE_SIZE[task] if image_size is None else image_size
        if transform is not None and not callable(transform):
            raise ValueError(f"transform={transform!r} is not callable; pass a function or None")
        self.render_kwargs = dict(image_size=image_size, max_shapes=max_shapes, style=style or ShapesStyle())
        # Fail here, at construction, rather than in a DataLoader worker later.
        _check_render_args(seed, split, image_size, max_shapes)
        self.task = task
        self.split = split
        self.size = int(size)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.max_shapes = int(max_shapes)
        self.transform = transform
        # Rendered samples kept by index (per process): worth it when epochs repeat and the
        # images are small, e.g. 5,000 classification images at 32 px take about 60 MB.
        self._cache: Optional[dict[int, ShapesSample]] = {} if cache else None
        self.classes = SHAPE_CLASSES
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> ShapesSample:
        """The raw numpy sample with all annotations (no transform applied)."""
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} is out of range for a data set of {self.size} images")
        index %= self.size
        if self._cache is None:
            return render_sample(self.seed, self.split, index, **self.render_kwargs)
        if index not in self._cache:
            self._cache[index] = render_sample(self.seed, self.split, index, **self.render_kwargs)
        return self._cache[index]

    def __getitem__(self, index: int):
        sample = self.sample(index)
        image = torch.from_numpy(sample.image)
        if self.transform is not None:
            image = self.transform(image)
        if self.task == "classification":
            return image, sample.label
        if self.task == "detection":
            return image, {
                "boxes": torch.from_numpy(sample.boxes),
                "labels": torch.from_numpy(sample.labels) + 1,
            }
        return image, torch.from_numpy(sample.mask)

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(task={self.task!r}, split={self.split!r}, size={self.size}, "
            f"image_size={self.image_size}, seed={self.seed}, max_shapes={self.max_shapes})"
        )
