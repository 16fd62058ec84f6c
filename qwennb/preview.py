"""Cheap previews of the latents while an image denoises: a linear map from the VAE's 16 latent channels to RGB.

Qwen-Image's VAE is the Wan 2.1 VAE (16 channels, the same ``latents_mean``/``latents_std``), and the
pipeline's latents are normalised the way ComfyUI's ``Wan21`` latent format normalises them, so ComfyUI's
``latent_rgb_factors`` for Wan 2.1 (``comfy/latent_formats.py``) apply as they are. The preview shows the
current estimate of the clean image, ``x0 = x_t - sigma_t * v`` (flow matching), with ``v`` taken from the
last two steps' latents; it costs one ``(pixels/64) x 16 x 3`` matrix product a preview, no VAE decode.

On the random ``tiny`` stand-in the latents mean nothing, so neither does the preview (noise in colour).

Example:
    >>> import torch
    >>> from qwennb.preview import latents_to_rgb
    >>> packed = torch.zeros(1, (64 // 16) * (64 // 16), 64)  # a 64x64 image's packed latents
    >>> latents_to_rgb(packed, 64, 64).size
    (8, 8)
"""

from __future__ import annotations

from typing import Any

# ComfyUI comfy/latent_formats.py, class Wan21: latent_rgb_factors (16 x 3) and latent_rgb_factors_bias.
WAN21_RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932],
    [0.0671, 0.0406, 0.0442],
    [0.3568, 0.2548, 0.1747],
    [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328],
    [0.0296, -0.0956, -0.0665],
    [-0.3477, -0.4059, -0.2925],
    [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364],
    [-0.1293, 0.0740, 0.1636],
    [0.0680, 0.3019, 0.1128],
    [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699],
    [0.0060, -0.0633, 0.0005],
    [0.3477, 0.2275, 0.2950],
    [0.1984, 0.0913, 0.1861],
]
WAN21_RGB_BIAS = [-0.1835, -0.0868, -0.3360]
VAE_SCALE = 8  # pixels per latent pixel (Qwen-Image's VAE); latents are packed in 2x2 patches on top
DEFAULT_EVERY = 2  # a preview every this many steps


def unpack(packed: Any, width: int, height: int) -> Any:
    """Packed latents ``(B, (H/16)*(W/16), 64)`` to ``(B, H/8, W/8, 16)`` (channels last)."""
    b, _, c4 = packed.shape
    h, w = 2 * (int(height) // (VAE_SCALE * 2)), 2 * (int(width) // (VAE_SCALE * 2))
    x = packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, h, w, c4 // 4)


def latents_to_rgb(packed: Any, width: int, height: int, index: int = 0) -> Any:
    """A PIL image (``W/8 x H/8``) of one sample of packed, normalised Qwen-Image latents."""
    import torch
    from PIL import Image

    with torch.no_grad():
        x = unpack(packed[index : index + 1].detach().float(), width, height)[0]
        factors = torch.tensor(WAN21_RGB_FACTORS, device=x.device)
        bias = torch.tensor(WAN21_RGB_BIAS, device=x.device)
        rgb = ((x @ factors + bias + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return Image.fromarray(rgb.numpy(), "RGB")


def x0_estimate(latents: Any, previous: Any, sigma: float, previous_sigma: float) -> Any:
    """The flow-matching estimate of the clean latents from two consecutive steps' latents.

    ``x_t = x0 + sigma_t * v`` along a straight path, so ``v = (x_t - x_prev) / (sigma_t - sigma_prev)``.

    Example:
        >>> import torch
        >>> x0, noise = torch.ones(1, 4, 64), torch.zeros(1, 4, 64)
        >>> prev, cur = x0 * 0.2 + noise * 0.8, x0 * 0.5 + noise * 0.5  # sigma 0.8 then 0.5 (v = noise - x0)
        >>> bool(torch.allclose(x0_estimate(cur, prev, 0.5, 0.8), x0))
        True
    """
    ds = sigma - previous_sigma
    if previous is None or ds == 0:
        return latents
    v = (latents - previous) / ds
    return latents - sigma * v


class Previewer:
    """Keeps the last step's latents and makes a preview every ``every`` steps (``StepInfo.preview``)."""

    def __init__(self, pipe: Any, width: int, height: int, every: int = DEFAULT_EVERY) -> None:
        self.pipe, self.width, self.height, self.every = pipe, width, height, max(1, int(every))
        self.previous: Any = None
        self.previous_sigma: float | None = None

    def __call__(self, step: int, total: int, latents: Any) -> Any:
        sigmas = getattr(getattr(self.pipe, "scheduler", None), "sigmas", None)
        sigma = float(sigmas[step]) if sigmas is not None and step < len(sigmas) else None
        image = None
        if (step % self.every == 0 or step == total) and self.previous is not None and sigma is not None:
            x0 = x0_estimate(latents, self.previous, sigma, self.previous_sigma)
            image = latents_to_rgb(x0, self.width, self.height)
        self.previous, self.previous_sigma = latents.detach().clone(), sigma
        return image
