"""Pathfinder / Path-X: the official PNG + metadata reader and a vectorised offline generator.

The generator follows the published algorithm of Linsley et al. / Kim et al. (`snakes2.py`, as
summarised in the project's LRA reference, section 3) but is an independent implementation that
grows a whole batch of images at once with numpy:

1. Two target contours ("snakes") of `contour_length` dashes are seeded `seed_distance` apart
   near the centre and grown alternately. Each step advances `paddle_length + gap` along the
   current heading (the dash covers the first `paddle_length`, leaving a visible gap) after
   turning by an angle drawn on a grid with weight `cos^2(min(continuity*|delta|, pi/2))`
   times "the step is free": no sample point of the step may lie within `clearance` of any
   earlier dash except the snake's own previous one, nor outside the padded canvas. If no
   candidate is free the image is discarded and regenerated.
2. `num_distractors` distractor snakes of `distractor_length` dashes are seeded at random free
   places and grown the same way; a distractor that gets stuck simply stops.
3. Two discs mark the start of target snake `i` and, for label 1, the end of the same snake or,
   for label 0, the end of the other one. Both targets have equal length, so no local cue gives
   the label away; the label comes from construction, not from image connectivity.
4. Dashes and discs are rendered anti-aliased (coverage falls off linearly over one pixel) and
   combined by pixel-wise max into uint8 images.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
from jaxtyping import Int32, UInt8

from ._common import LRA_SOURCE, check_positive, check_split_sizes, make_rng, read_lines
from .batching import Split, TaskData

__all__ = [
    "DIFFICULTIES",
    "PathfinderConfig",
    "PathfinderMetadata",
    "generate_pathfinder",
    "load_pathfinder",
    "make_pathfinder_task",
    "read_pathfinder_metadata",
]

DIFFICULTIES = {
    "baseline": ("curv_baseline", 6),
    "intermediate": ("curv_contour_length_9", 9),
    "hard": ("curv_contour_length_14", 14),
}
"""Pathfinder difficulties: name -> (folder of the official release, contour length).

LRA's Pathfinder and Path-X use `"hard"` (`curv_contour_length_14`).
"""
_FOLDER_TO_LENGTH = {folder: length for folder, length in DIFFICULTIES.values()}


@dataclasses.dataclass(frozen=True)
class PathfinderConfig:
    """Generator settings, in output pixels; defaults are LRA's 32x32 "hard" setting.

    **Arguments:**

    - `resolution`: image side N (sequence length N*N).
    - `contour_length`: dashes per target snake (6 / 9 / 14 = baseline / intermediate / hard).
    - `paddle_length`: dash length.
    - `gap`: empty space between consecutive dashes of a snake.
    - `thickness`: rendered stroke width.
    - `clearance`: minimum distance from a new step to other dashes' centre lines.
    - `seed_distance`: distance between the two target snakes' tails.
    - `continuity`: turn weight `cos^2(min(continuity*|delta|, pi/2))`; 1.0 allows turns up to
      90 degrees, 1.8 up to 50.
    - `num_distractors`: distractor snakes per image.
    - `distractor_length`: dashes per distractor; `None` means `contour_length // 3`.
    - `marker_radius`: radius of the two endpoint discs.
    - `padding`: border kept empty.
    - `num_angles`: turn candidates on a uniform grid over [-90, 90] degrees.
    - `supersample`: occupancy grid cells per pixel side.
    - `num_train`, `num_val`, `num_test`: split sizes for `make_pathfinder_task`.
    """

    resolution: int = 32
    contour_length: int = 14
    paddle_length: float = 2.0
    gap: float = 1.0
    thickness: float = 1.0
    clearance: float = 1.5
    seed_distance: float = 7.0
    continuity: float = 1.0
    num_distractors: int = 5
    distractor_length: int | None = None
    marker_radius: float = 1.5
    padding: float = 1.0
    num_angles: int = 25
    supersample: int = 2
    num_train: int = 16_000
    num_val: int = 2_000
    num_test: int = 2_000

    def __post_init__(self) -> None:
        check_positive("resolution", self.resolution)
        check_positive("contour_length", self.contour_length)
        check_positive("supersample", self.supersample)
        check_split_sizes(self)
        if self.num_angles < 3:
            raise ValueError(f"num_angles must be >= 3, got {self.num_angles}.")
        for name in ("paddle_length", "thickness", "clearance", "seed_distance", "continuity"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.gap < 0 or self.padding < 0 or self.num_distractors < 0:
            raise ValueError("gap, padding and num_distractors must be >= 0.")
        if self.seed_distance + 2 * self.padding >= self.resolution:
            raise ValueError(
                f"seed_distance={self.seed_distance} does not fit in a {self.resolution}px "
                f"image with padding {self.padding}."
            )

    @property
    def distractor_dashes(self) -> int:
        """Dashes per distractor snake."""
        if self.distractor_length is not None:
            return self.distractor_length
        return max(1, self.contour_length // 3)

    @classmethod
    def for_difficulty(cls, difficulty: str, **overrides: object) -> PathfinderConfig:
        """Config with LRA's contour length for `"baseline"`, `"intermediate"` or `"hard"`.

        **Arguments:**

        - `difficulty`: one of `DIFFICULTIES`.
        - `overrides`: other fields.

        **Returns:**

        The config.

        **Raises:**

        `ValueError` for an unknown difficulty.
        """
        if difficulty not in DIFFICULTIES:
            raise ValueError(
                f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}."
            )
        return cls(contour_length=DIFFICULTIES[difficulty][1], **overrides)  # type: ignore[arg-type]

    @classmethod
    def pathx(cls, **overrides: object) -> PathfinderConfig:
        """Path-X-like 128x128 setting (LRA's pathfinder128 parameters, approximately).

        **Arguments:**

        - `overrides`: fields to change.

        **Returns:**

        The config.
        """
        fields: dict[str, object] = dict(
            resolution=128,
            paddle_length=5.0,
            gap=3.0,
            thickness=1.5,
            clearance=3.5,
            seed_distance=20.0,
            continuity=1.8,
            num_distractors=7,
            distractor_length=4,
            marker_radius=3.0,
            padding=1.0,
            supersample=1,
        )
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True, eq=False)
class PathfinderMetadata:
    """Construction record of generated images (ground truth for tests and debugging).

    **Arguments:**

    - `dashes`: float32 `(n, d, 2, 2)`: dash `j` runs from `dashes[:, j, 0]` to
      `dashes[:, j, 1]` as (x, y) in pixels; NaN where a distractor dash was not placed.
    - `dash_snake`: int32 `(d,)`: snake of each dash (0, 1 = targets; 2+ = distractors).
    - `markers`: float32 `(n, 2, 2)`: centres of the two discs.
    - `marker_snakes`: int32 `(n, 2)`: the snake whose start / end each disc marks.
    """

    dashes: np.ndarray
    dash_snake: np.ndarray
    markers: np.ndarray
    marker_snakes: np.ndarray


def _seg_dist(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Distance from points (B, P) to segments a->b given as (B, 2).
    ax, ay = a[:, 0:1], a[:, 1:2]
    dx, dy = b[:, 0:1] - ax, b[:, 1:2] - ay
    den = np.maximum(dx * dx + dy * dy, 1e-12)
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / den, 0.0, 1.0)
    return np.hypot(px - ax - t * dx, py - ay - t * dy)


class _Canvas:
    """Occupancy map of a batch: -1 = free, else the id of the dash claiming the cell."""

    def __init__(self, cfg: PathfinderConfig, batch: int) -> None:
        self.cfg = cfg
        self.s = cfg.supersample
        self.n = cfg.resolution * self.s
        self.ids = np.full((batch, self.n, self.n), -1, dtype=np.int16)
        half = (cfg.paddle_length / 2 + cfg.clearance) * self.s
        h = int(math.ceil(half)) + 1
        oy, ox = np.mgrid[-h : h + 1, -h : h + 1].astype(np.int32)
        # Only cells that can lie within `clearance` of the dash matter: trim the patch corners.
        keep = np.hypot(oy, ox) <= h + 1
        self.off = (oy[keep], ox[keep])
        lo, hi = cfg.padding, cfg.resolution - cfg.padding
        self.lo, self.hi = lo, hi
        step = cfg.paddle_length + cfg.gap
        self.n_samples = max(2, int(math.ceil(step * self.s)))

    def blocked(self, x: np.ndarray, y: np.ndarray, own: np.ndarray) -> np.ndarray:
        """x, y (B, ...) -> bool (B, ...): outside the padded canvas or claimed by a dash
        other than `own` (B,)."""
        pts = x
        out = (x < self.lo) | (x > self.hi) | (y < self.lo) | (y > self.hi)
        n = self.n
        cx = np.clip((x * self.s).astype(np.int32), 0, n - 1)
        cy = np.clip((y * self.s).astype(np.int32), 0, n - 1)
        base = (np.arange(pts.shape[0], dtype=np.int64) * (n * n)).reshape(
            (-1,) + (1,) * (pts.ndim - 1)
        )
        v = self.ids.reshape(-1)[base + cy * n + cx]
        own_b = own.reshape((-1,) + (1,) * (pts.ndim - 1))
        return out | ((v != -1) & (v != own_b))

    def claim(self, a: np.ndarray, b: np.ndarray, dash_id: int, active: np.ndarray) -> None:
        """Mark free cells within `clearance` of segments a->b for the active images."""
        rows = np.flatnonzero(active)
        if rows.size == 0:
            return
        a, b = a[rows], b[rows]
        mid = (a + b) / 2 * self.s
        cy = np.floor(mid[:, 1:2]).astype(np.int32) + self.off[0][None, :]
        cx = np.floor(mid[:, 0:1]).astype(np.int32) + self.off[1][None, :]
        inside = (cx >= 0) & (cx < self.n) & (cy >= 0) & (cy < self.n)
        cxc, cyc = np.clip(cx, 0, self.n - 1), np.clip(cy, 0, self.n - 1)
        scale = np.float32(1.0 / self.s)
        d = _seg_dist(
            (cxc.astype(np.float32) + 0.5) * scale,
            (cyc.astype(np.float32) + 0.5) * scale,
            a.astype(np.float32),
            b.astype(np.float32),
        )
        n = self.n
        flat = rows[:, None].astype(np.int64) * (n * n) + cyc * n + cxc
        ids = self.ids.reshape(-1)
        take = inside & (d < self.cfg.clearance) & (ids[flat] == -1)
        ids[flat[take]] = dash_id


def _unit(theta: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(theta), np.sin(theta)], axis=-1)


class _Builder:
    """Grows snakes for a batch of images, recording dashes."""

    def __init__(self, cfg: PathfinderConfig, batch: int, rng: np.random.Generator) -> None:
        self.cfg, self.rng, self.batch = cfg, rng, batch
        self.canvas = _Canvas(cfg, batch)
        self.dashes: list[np.ndarray] = []
        self.dash_snake: list[int] = []
        self.step = cfg.paddle_length + cfg.gap
        deltas = np.linspace(-np.pi / 2, np.pi / 2, cfg.num_angles)
        self.deltas = deltas
        self.turn_w = np.cos(np.minimum(cfg.continuity * np.abs(deltas), np.pi / 2)) ** 2
        n_s = self.canvas.n_samples
        self.t_first = np.linspace(0.0, 1.0, n_s)
        self.t_next = np.linspace(1.0 / n_s, 1.0, n_s)

    def _step_points(
        self, start: np.ndarray, theta: np.ndarray, ts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        # start (B, 2), theta (B, K) -> sample x, y along each step, each (B, K, S) float32.
        th = theta.astype(np.float32)
        dist = (ts * self.step).astype(np.float32)[None, None, :]
        x = start[:, 0, None, None].astype(np.float32) + np.cos(th)[:, :, None] * dist
        y = start[:, 1, None, None].astype(np.float32) + np.sin(th)[:, :, None] * dist
        return x, y

    def place(self, a: np.ndarray, theta: np.ndarray, snake: int, ok: np.ndarray) -> np.ndarray:
        b = a + self.cfg.paddle_length * _unit(theta)
        seg = np.full((self.batch, 2, 2), np.nan, dtype=np.float32)
        seg[ok, 0], seg[ok, 1] = a[ok], b[ok]
        dash_id = len(self.dashes)
        self.dashes.append(seg)
        self.dash_snake.append(snake)
        self.canvas.claim(a, b, dash_id, ok)
        return np.full(self.batch, dash_id, dtype=np.int16)

    def seed(self, pos: np.ndarray, theta: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """pos (B, M, 2), theta (B, M): the first free candidate per image; returns index or -1."""
        dist = self.t_first[None, None, :] * self.step
        x = pos[:, :, 0, None] + np.cos(theta)[:, :, None] * dist
        y = pos[:, :, 1, None] + np.sin(theta)[:, :, None] * dist
        none = np.full(self.batch, -3, dtype=np.int16)
        free = ~self.canvas.blocked(x, y, none).any(axis=-1)
        free &= ok[:, None]
        return np.where(free.any(axis=1), free.argmax(axis=1), -1)

    def grow(
        self, pos: np.ndarray, theta: np.ndarray, last: np.ndarray, snake: int, ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One step for every image: returns new (pos, theta, last_id, ok)."""
        start = pos + self.step * _unit(theta)
        cand = theta[:, None] + self.deltas[None, :]
        x, y = self._step_points(start, cand, self.t_next)
        free = ~self.canvas.blocked(x, y, last).any(axis=-1)
        w = free * self.turn_w[None, :]
        total = w.sum(axis=1)
        ok = ok & (total > 0)
        u = self.rng.random(self.batch) * total
        k = (np.cumsum(w, axis=1) < u[:, None]).sum(axis=1)
        k = np.minimum(k, self.cfg.num_angles - 1)
        new_theta = cand[np.arange(self.batch), k]
        last = np.where(ok, self.place(start, new_theta, snake, ok), last)
        return start, new_theta, last, ok


def _render(
    cfg: PathfinderConfig, dashes: np.ndarray, markers: np.ndarray
) -> UInt8[np.ndarray, "n r r"]:
    n, r = dashes.shape[0], cfg.resolution
    img = np.zeros((n, r * r), dtype=np.float32)
    half_w = cfg.thickness / 2
    h = int(math.ceil(cfg.paddle_length / 2 + half_w + 1.0)) + 1
    oy, ox = np.mgrid[-h : h + 1, -h : h + 1]
    rows = np.arange(n)[:, None]
    for j in range(dashes.shape[1]):
        a, b = dashes[:, j, 0], dashes[:, j, 1]
        valid = ~np.isnan(a[:, 0])
        mid = np.where(valid[:, None], (a + b) / 2, 0.0)
        cx = np.floor(mid[:, 0:1]).astype(np.int64) + ox.ravel()[None, :]
        cy = np.floor(mid[:, 1:2]).astype(np.int64) + oy.ravel()[None, :]
        inside = (cx >= 0) & (cx < r) & (cy >= 0) & (cy < r) & valid[:, None]
        d = _seg_dist(cx + 0.5, cy + 0.5, np.nan_to_num(a), np.nan_to_num(b))
        val = np.where(inside, np.clip(half_w + 0.5 - d, 0.0, 1.0), 0.0)
        flat = np.clip(cy, 0, r - 1) * r + np.clip(cx, 0, r - 1)
        img[rows, flat] = np.maximum(img[rows, flat], val)
    hm = int(math.ceil(cfg.marker_radius + 1.0)) + 1
    my, mx = np.mgrid[-hm : hm + 1, -hm : hm + 1]
    for j in range(markers.shape[1]):
        c = markers[:, j]
        cx = np.floor(c[:, 0:1]).astype(np.int64) + mx.ravel()[None, :]
        cy = np.floor(c[:, 1:2]).astype(np.int64) + my.ravel()[None, :]
        inside = (cx >= 0) & (cx < r) & (cy >= 0) & (cy < r)
        d = np.hypot(cx + 0.5 - c[:, 0:1], cy + 0.5 - c[:, 1:2])
        val = np.where(inside, np.clip(cfg.marker_radius + 0.5 - d, 0.0, 1.0), 0.0)
        flat = np.clip(cy, 0, r - 1) * r + np.clip(cx, 0, r - 1)
        img[rows, flat] = np.maximum(img[rows, flat], val)
    return np.rint(img * 255.0).astype(np.uint8).reshape(n, r, r)


def _attempt(
    cfg: PathfinderConfig, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Try to build `batch` images; returns (ok, dashes, dash_snake, markers, marker_snakes)."""
    bld = _Builder(cfg, batch, rng)
    res, tries = cfg.resolution, 16
    ok = np.ones(batch, dtype=bool)
    # Target tails: near the centre, at least 2*seed_distance from the border where possible.
    border = min(2 * cfg.seed_distance, res / 2 - 1)
    tail1 = border + rng.random((batch, 2)) * (res - 2 * border)
    th1 = rng.random(batch) * 2 * np.pi
    last1 = bld.place(tail1, th1, 0, ok)
    phi = rng.random((batch, tries)) * 2 * np.pi
    cand = tail1[:, None, :] + cfg.seed_distance * _unit(phi)
    cth = rng.random((batch, tries)) * 2 * np.pi
    pick = bld.seed(cand, cth, ok)
    ok &= pick >= 0
    sel = np.maximum(pick, 0)
    tail2 = cand[np.arange(batch), sel]
    th2 = cth[np.arange(batch), sel]
    last2 = np.where(ok, bld.place(tail2, th2, 1, ok), -1).astype(np.int16)
    p1, p2 = tail1, tail2
    for _ in range(cfg.contour_length - 1):
        p1, th1, last1, ok = bld.grow(p1, th1, last1, 0, ok)
        p2, th2, last2, ok = bld.grow(p2, th2, last2, 1, ok)
    end1 = p1 + cfg.paddle_length * _unit(th1)
    end2 = p2 + cfg.paddle_length * _unit(th2)
    lo, hi = cfg.padding, res - cfg.padding
    for s in range(cfg.num_distractors):
        pos = lo + rng.random((batch, tries, 2)) * (hi - lo)
        th = rng.random((batch, tries)) * 2 * np.pi
        pick = bld.seed(pos, th, ok)
        alive = ok & (pick >= 0)
        sel = np.maximum(pick, 0)
        p, t = pos[np.arange(batch), sel], th[np.arange(batch), sel]
        last = bld.place(p, t, 2 + s, alive)
        for _ in range(cfg.distractor_dashes - 1):
            p, t, last, alive = bld.grow(p, t, last, 2 + s, alive)
    labels = rng.integers(0, 2, size=batch)
    first = rng.integers(0, 2, size=batch)
    second = np.where(labels == 1, first, 1 - first)
    starts = np.stack([tail1, tail2], axis=1)
    ends = np.stack([end1, end2], axis=1)
    rows = np.arange(batch)
    markers = np.stack([starts[rows, first], ends[rows, second]], axis=1).astype(np.float32)
    dashes = np.stack(bld.dashes, axis=1)
    return ok, dashes, np.asarray(bld.dash_snake, np.int32), markers, np.stack([first, second], 1)


def generate_pathfinder(
    num_examples: int,
    config: PathfinderConfig = PathfinderConfig(),
    seed: int | np.random.Generator = 0,
    return_metadata: bool = False,
    chunk_size: int = 1024,
) -> (
    tuple[UInt8[np.ndarray, "n r r"], Int32[np.ndarray, " n"]]
    | tuple[UInt8[np.ndarray, "n r r"], Int32[np.ndarray, " n"], PathfinderMetadata]
):
    """Generate Pathfinder images with construction labels (see the module docstring).

    **Arguments:**

    - `num_examples`: number of images.
    - `config`: geometry and difficulty.
    - `seed`: int seed or generator; output is a pure function of it (and `chunk_size`).
    - `return_metadata`: also return the `PathfinderMetadata` construction record.
    - `chunk_size`: images attempted per vectorised batch.

    **Returns:**

    `(images uint8 (n, N, N), labels int32 (n,))`, plus the metadata if requested. Label 1
    means the two discs sit on the two ends of the same contour.
    """
    check_positive("chunk_size", chunk_size)
    rng = make_rng(seed)
    imgs, labs, metas = [], [], []
    have = 0
    while have < num_examples:
        need = num_examples - have
        batch = min(chunk_size, max(16, int(need * 1.3) + 8))
        ok, dashes, dash_snake, markers, msnake = _attempt(config, batch, rng)
        idx = np.flatnonzero(ok)[:need]
        if idx.size == 0:
            continue
        d, m, ms = dashes[idx], markers[idx], msnake[idx]
        imgs.append(_render(config, d, m))
        labs.append((ms[:, 0] == ms[:, 1]).astype(np.int32))
        if return_metadata:
            metas.append((d, m, ms.astype(np.int32), dash_snake))
        have += idx.size
    images = (
        np.concatenate(imgs)
        if imgs
        else np.zeros((0, config.resolution, config.resolution), np.uint8)
    )
    labels = np.concatenate(labs) if labs else np.zeros(0, np.int32)
    if not return_metadata:
        return images, labels
    meta = PathfinderMetadata(
        dashes=np.concatenate([x[0] for x in metas]),
        dash_snake=metas[0][3],
        markers=np.concatenate([x[1] for x in metas]),
        marker_snakes=np.concatenate([x[2] for x in metas]),
    )
    return images, labels, meta


def _images_split(images: np.ndarray, labels: np.ndarray) -> Split:
    # Rows of pixels, whether the images come as (n, h, w) or already flat; the explicit row
    # width keeps an empty split's shape, which reshape(n, -1) cannot infer.
    n = images.shape[0]
    tokens = np.ascontiguousarray(images.reshape(n, math.prod(images.shape[1:])))
    return Split(tokens, np.full(n, tokens.shape[1], np.int32), labels.astype(np.int32))


def make_pathfinder_task(
    config: PathfinderConfig = PathfinderConfig(), seed: int = 0, name: str = "pathfinder"
) -> TaskData:
    """Generate a Pathfinder task offline (train / val / test drawn independently).

    **Arguments:**

    - `config`: generator settings and split sizes.
    - `seed`: int seed.
    - `name`: task name stored in the result.

    **Returns:**

    `TaskData` (vocab 256, 2 classes, length `resolution**2`).
    """
    rng = np.random.default_rng(seed)
    splits = []
    for n in (config.num_train, config.num_val, config.num_test):
        images, labels = generate_pathfinder(n, config, rng)[:2]
        splits.append(_images_split(images, labels))
    return TaskData(
        *splits,
        vocab_size=256,
        num_classes=2,
        dual=False,
        name=f"{name}_generated",
        description=(
            f"Pathfinder generated offline (independent implementation of the published "
            f"algorithm), {config.resolution}x{config.resolution}, contour length "
            f"{config.contour_length}, seed {seed}."
        ),
    )


def read_pathfinder_metadata(path: str | Path) -> list[tuple[str, str, int]]:
    """Parse one metadata file (plain text despite the `.npy` extension).

    Each non-empty line has 11 space-separated fields: `imgs/<batch> sample_<k>.png <k> <label>
    <continuity> <contour_length> <distractor_length> <paddle_length> <paddle_thickness>
    <paddle_margin> <n_contrast_levels>`.

    **Arguments:**

    - `path`: the metadata file.

    **Returns:**

    `[(image_dir, file_name, label), ...]` in file order.

    **Raises:**

    `ValueError` naming the file and line for bytes that are not UTF-8 (a binary `.npy` file
    among them), a row without 11 fields or a label not 0/1.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise ValueError(
                f"{path}:1: a binary NumPy array, not Pathfinder metadata; the official "
                "metadata files are text lines despite their .npy extension (11 space-separated "
                "fields each)."
            )
    rows = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        f = line.split(" ")
        if len(f) != 11:
            raise ValueError(
                f"{path}:{lineno}: expected 11 space-separated metadata fields, got {len(f)}."
            )
        if f[3] not in ("0", "1"):
            raise ValueError(f"{path}:{lineno}: label field must be 0 or 1, got {f[3]!r}.")
        rows.append((f[0], f[1], int(f[3])))
    return rows


def _read_png(path: Path) -> UInt8[np.ndarray, "h w"]:
    # An 8-bit grayscale image; colour images are reduced to gray with the weights LRA's
    # TensorFlow pipeline uses (Pillow's own "L" conversion rounds other weights).
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            f"{path}: reading Pathfinder's PNG images needs Pillow; install it with "
            "`pip install pillow` (or `pip install 'pdeformer[data]'`)."
        ) from None
    from .image import rgb_to_gray_tf

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA"):
                return rgb_to_gray_tf(np.asarray(im.convert("RGB"), dtype=np.uint8))
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot decode the PNG image ({exc}).") from None


def _batch_key(p: Path) -> tuple[int, str]:
    m = re.match(r"(\d+)", p.stem)
    return (int(m.group(1)) if m else 1 << 60, p.name)


def load_pathfinder(
    data_dir: str | Path,
    resolution: int = 32,
    difficulty: str = "curv_contour_length_14",
    *,
    max_examples: int | None = None,
    skip_empty: bool = True,
) -> TaskData:
    """Load official Pathfinder / Path-X images with a deterministic 80/10/10 split.

    Metadata files are read in numeric batch order and lines in file order; the first 80% of
    the (non-empty) images are train, the next 10% val, the last 10% test, like LRA's TFDS
    slicing (rounded down, so a handful of images leaves some splits empty). There is no
    official split, so numbers from other codebases use other test sets.

    **Arguments:**

    - `data_dir`: the extracted LRA release directory containing `pathfinder<res>/`, or the
      `pathfinder<res>` directory itself.
    - `resolution`: 32 (Pathfinder), 64, 128 (Path-X) or 256.
    - `difficulty`: `curv_baseline`, `curv_contour_length_9` or `curv_contour_length_14` (the
      LRA default, "hard"); the aliases `baseline` / `intermediate` / `hard` also work.
    - `max_examples`: read only the first this many metadata rows (before the split).
    - `skip_empty`: skip 0-byte PNGs (the release has one, pathfinder32/curv_baseline/imgs/0/
      sample_172.png; LRA filters it too); if False they raise.

    **Returns:**

    `TaskData` named `pathfinder` (32) or `pathx` (128) / `pathfinder<res>`.

    **Raises:**

    `FileNotFoundError` listing the expected layout if the folder is missing; `ValueError`
    naming the file for malformed metadata, an image that does not decode, is empty (with
    `skip_empty=False`) or has the wrong size, and for `max_examples < 1`; `ImportError` if
    Pillow, which reads the PNG images, is missing.
    """
    if max_examples is not None:
        check_positive("max_examples", max_examples)
    if difficulty in DIFFICULTIES:
        difficulty = DIFFICULTIES[difficulty][0]
    if difficulty not in _FOLDER_TO_LENGTH:
        raise ValueError(
            f"difficulty must be one of {sorted(_FOLDER_TO_LENGTH)} (or baseline/intermediate/"
            f"hard), got {difficulty!r}."
        )
    root = Path(data_dir)
    base = root / f"pathfinder{resolution}" / difficulty
    if not base.is_dir() and root.name == f"pathfinder{resolution}":
        base = root / difficulty
    meta_dir = base / "metadata"
    meta_files = sorted(meta_dir.glob("*.npy"), key=_batch_key) if meta_dir.is_dir() else []
    if not meta_files:
        raise FileNotFoundError(
            f"pathfinder: no metadata under {meta_dir}.\nExpected layout:\n"
            f"  {root}/pathfinder{resolution}/{difficulty}/metadata/<batch>.npy (text lines)\n"
            f"  {root}/pathfinder{resolution}/{difficulty}/imgs/<batch>/sample_<k>.png\n"
            f"The official data comes from {LRA_SOURCE}."
        )
    images, labels = [], []
    for mf in meta_files:
        for img_dir, fname, label in read_pathfinder_metadata(mf):
            if max_examples is not None and len(labels) >= max_examples:
                break
            png = base / img_dir / fname
            if not png.is_file():
                raise FileNotFoundError(f"{png}: image listed in {mf} does not exist.")
            if png.stat().st_size == 0:
                if skip_empty:
                    continue
                raise ValueError(
                    f"{png}: PNG file is empty (0 bytes); pass skip_empty=True to skip it."
                )
            img = _read_png(png)
            if img.shape != (resolution, resolution):
                raise ValueError(
                    f"{png}: expected a {resolution}x{resolution} image, got {img.shape}."
                )
            images.append(img.reshape(-1))
            labels.append(label)
    if not labels:
        raise ValueError(f"pathfinder: no usable images listed under {meta_dir}.")
    x = np.stack(images)
    y = np.asarray(labels, dtype=np.int32)
    n = y.shape[0]
    a, b = int(n * 0.8), int(n * 0.9)
    name = {32: "pathfinder", 128: "pathx"}.get(resolution, f"pathfinder{resolution}")
    return TaskData(
        _images_split(x[:a], y[:a]),
        _images_split(x[a:b], y[a:b]),
        _images_split(x[b:], y[b:]),
        vocab_size=256,
        num_classes=2,
        dual=False,
        name=name,
        description=f"Official pathfinder{resolution}/{difficulty} from {root}, 80/10/10 in "
        "metadata order.",
    )


def marker_on_same_contour(meta: PathfinderMetadata) -> np.ndarray:
    """Whether the two discs mark the same snake, per image (equals the label by construction).

    **Arguments:**

    - `meta`: the construction record.

    **Returns:**

    bool `(n,)`.
    """
    return meta.marker_snakes[:, 0] == meta.marker_snakes[:, 1]
