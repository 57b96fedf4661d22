"""Quality of a cached generation against the uncached one: PSNR, SSIM (pytorch-msssim), relative L2.

Images are compared on the reference's value range: both are mapped with the reference's min and
max to [0, 1] (clamped), so PSNR and SSIM use ``data_range=1``.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class Quality:
    psnr: float
    ssim: float
    rel_l2: float


def compare(images: torch.Tensor, reference: torch.Tensor) -> Quality:
    """``images`` and ``reference``: [N, C, H, W] in any range (C = 1 or 3)."""
    try:
        from pytorch_msssim import ssim
    except ImportError as e:
        raise ImportError("quality metrics need pytorch-msssim: pip install pytorch-msssim") from e
    images, reference = images.detach().float().cpu(), reference.detach().float().cpu()
    rel_l2 = (torch.linalg.vector_norm(images - reference) / torch.linalg.vector_norm(reference)).item()
    lo, hi = reference.min(), reference.max()
    scale = (hi - lo).clamp_min(1e-12)
    x = ((images - lo) / scale).clamp(0, 1)
    y = ((reference - lo) / scale).clamp(0, 1)
    mse = torch.mean((x - y) ** 2).item()
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    side = min(x.shape[-2:])
    window = min(11, side if side % 2 else side - 1)
    similarity = ssim(x, y, data_range=1.0, size_average=True, win_size=window).item()
    return Quality(psnr=psnr, ssim=similarity, rel_l2=rel_l2)
