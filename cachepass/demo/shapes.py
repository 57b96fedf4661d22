"""Procedural clips: a coloured shape moving over a plain or textured background, with a caption.

Everything is drawn with tensor ops on the target device (no files, no downloads), from a seeded
generator, so training data is reproducible and costs no disk. Clips are ``[B, 3, F, H, W]`` in
[-1, 1]; captions read "a red circle moving left".
"""

from __future__ import annotations

import dataclasses
import math

import torch

COLORS = {
    "red": (0.95, 0.15, 0.1),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.15),
    "magenta": (0.9, 0.15, 0.85),
    "cyan": (0.15, 0.9, 0.9),
    "white": (0.95, 0.95, 0.95),
    "orange": (0.98, 0.55, 0.1),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    frames: int = 8
    size: int = 32
    radius: tuple[float, float] = (4.5, 6.5)
    speed: tuple[float, float] = (1.3, 2.0)  # pixels per frame


def caption(color: str, shape: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def render(color: torch.Tensor, shape: torch.Tensor, direction: torch.Tensor, g: torch.Generator,
           spec: ClipSpec = ClipSpec(), device: torch.device | str = "cpu") -> torch.Tensor:
    """Clips for index tensors into COLORS / SHAPES / DIRECTIONS; random size, speed, start, background."""
    n, f, s = color.shape[0], spec.frames, spec.size

    def uniform(lo, hi, *shape):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g)).to(device)

    radius = uniform(*spec.radius, n)
    speed = uniform(*spec.speed, n)
    color, shape, direction = color.to(device), shape.to(device), direction.to(device)
    step = torch.tensor(list(DIRECTIONS.values()), device=device)[direction] * speed[:, None]  # [n, 2] px/frame
    travel = step * (f - 1)
    margin = radius + 1
    # start so that the whole path stays inside the frame
    low = margin[:, None] - travel.clamp(max=0)
    high = (s - margin)[:, None] - travel.clamp(min=0)
    start = low + (high - low).clamp(min=0) * uniform(0, 1, n, 2)
    t = torch.arange(f, dtype=torch.float32, device=device)
    centers = start[:, None, :] + t[None, :, None] * step[:, None, :]  # [n, f, 2] (x, y)

    grid = torch.arange(s, dtype=torch.float32, device=device) + 0.5
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    dx = xs[None, None] - centers[..., 0, None, None]  # [n, f, s, s]
    dy = ys[None, None] - centers[..., 1, None, None]
    r = radius[:, None, None, None]
    circle = r - torch.sqrt(dx**2 + dy**2)
    square = r * 0.9 - torch.maximum(dx.abs(), dy.abs())
    # upward triangle: inside when below the top edge and within the widening sides
    tri_height = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    triangle = torch.minimum(torch.minimum(r - dy, dy + r), tri_height * r * 1.1 - dx.abs())
    signed = torch.stack([circle, square, triangle], dim=1)[torch.arange(n, device=device), shape]  # [n, f, s, s]
    mask = torch.sigmoid(signed * 3.0)[:, None]  # soft edge, [n, 1, f, s, s]

    background = _backgrounds(n, g, xs, ys)  # [n, 3, 1, s, s]
    rgb = torch.tensor(list(COLORS.values()), device=device)[color][:, :, None, None, None]  # [n, 3, 1, 1, 1]
    clip = background * (1 - mask) + rgb * mask
    return clip * 2 - 1


def _backgrounds(n: int, g: torch.Generator, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Dark plain colours; two thirds with low-contrast stripes or checks."""
    device = xs.device
    base = (0.05 + 0.25 * torch.rand(n, 3, generator=g)).to(device)
    kind = torch.randint(0, 3, (n,), generator=g).to(device)  # 0 plain, 1 stripes, 2 checks
    period = (4 + 6 * torch.rand(n, generator=g)).to(device)
    angle = (math.pi * torch.rand(n, generator=g)).to(device)
    u = xs[None] * torch.cos(angle)[:, None, None] + ys[None] * torch.sin(angle)[:, None, None]
    stripes = torch.sin(2 * math.pi * u / period[:, None, None])
    checks = torch.sign(torch.sin(2 * math.pi * xs[None] / period[:, None, None]) *
                        torch.sin(2 * math.pi * ys[None] / period[:, None, None]))
    texture = torch.where(kind[:, None, None] == 1, stripes, torch.where(kind[:, None, None] == 2, checks, 0.0))
    return (base[:, :, None, None] + 0.06 * texture[:, None]).clamp(0, 1)[:, :, None]


def random_batch(n: int, g: torch.Generator, spec: ClipSpec = ClipSpec(), device="cpu"):
    """(clips, captions) with every attribute drawn uniformly."""
    color = torch.randint(0, len(COLORS), (n,), generator=g)
    shape = torch.randint(0, len(SHAPES), (n,), generator=g)
    direction = torch.randint(0, len(DIRECTIONS), (n,), generator=g)
    names = list(COLORS), list(DIRECTIONS)
    captions = [caption(names[0][c], SHAPES[s], names[1][d]) for c, s, d in zip(color, shape, direction)]
    return render(color, shape, direction, g, spec, device), captions


def describe(clip: torch.Tensor) -> tuple[str, str | None, float]:
    """Measured on the pixels of one clip [3, F, H, W] in [-1, 1]: (colour, direction, distance moved).

    The background is each frame's median colour; the object is every pixel far from it. Its mean
    colour's nearest palette entry is the colour; the larger component of its centroid's travel from
    the first to the last frame gives the direction (None if it moved less than 3 pixels).
    """
    rgb = ((clip.float().cpu() + 1) / 2).clamp(0, 1)  # [3, F, H, W]
    background = rgb.flatten(2).median(dim=2).values[:, :, None, None]
    distance_from_background = (rgb - background).norm(dim=0)  # [F, H, W]
    mask = distance_from_background > 0.3
    if mask.sum() == 0:
        return "none", None, 0.0
    core = distance_from_background >= distance_from_background[mask].quantile(0.5)  # skip soft edges
    mean = (rgb * core).sum(dim=(1, 2, 3)) / core.sum()
    palette = torch.tensor(list(COLORS.values()))
    color = list(COLORS)[int((palette - mean).norm(dim=1).argmin())]
    ys, xs = torch.meshgrid(torch.arange(rgb.shape[2]).float(), torch.arange(rgb.shape[3]).float(), indexing="ij")
    area = mask.sum(dim=(1, 2)).clamp(min=1)
    centroid = torch.stack([(xs * mask).sum(dim=(1, 2)) / area, (ys * mask).sum(dim=(1, 2)) / area], dim=1)
    dx, dy = (centroid[-1] - centroid[0]).tolist()
    distance = max(abs(dx), abs(dy))
    if distance < 3:
        return color, None, distance
    if abs(dx) >= abs(dy):
        return color, "right" if dx > 0 else "left", distance
    return color, "down" if dy > 0 else "up", distance
