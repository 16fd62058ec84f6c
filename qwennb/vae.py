"""Qwen-Image's VAE on single images: its causal 3D convolutions as the 2D convolutions they are for one frame.

``AutoencoderKLQwenImage`` (Wan's video VAE) pads every causal ``Conv3d`` with ``kernel_t - 1`` frames of zeros
before the first frame, so on an image (one frame, nothing cached) each convolution computes ``kernel_t`` temporal
taps of which all but the last multiply zeros. The last tap alone, as a ``conv2d``, gives the same output up to the
order of the float sums: measured on the toy VAE's 256x256 decode on the 2-core CPU, 0.85 s -> 0.20 s with a
relative error of 6e-7 (``benchmarks/NOTES.md``, session 15); on an H200 the full-size VAE in bf16 decodes a
1024x1024 image in 0.042 s against 0.069 and encodes one in 0.027 against 0.044 (1.6x), its error against float32
the same as stock's to three digits (``benchmarks/results/vae2d-nvidia-h200.md``). The spatial padding is left to
``conv2d`` (one operation less than diffusers' ``F.pad`` + ``conv3d``). Tiled (the plan tiles the VAE on small
cards) the decode waits on the host rather than the GPU: there the 2D path measured 0.64-0.73x with a separate
``F.pad``, and 1.03x (decode) / 1.06x (encode) with the padding in ``conv2d``, within the run-to-run spread of stock
itself (0.72-0.92 s for a 1328x1328 decode). Anything else (several frames, a cached frame, a temporal stride) goes
through diffusers' own ``forward``. Applied by the plan where it was measured faster: CPUs and CUDA GPUs, the VAE
untiled; not on Apple's MPS (not measured).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d


class ImageCausalConv3d(QwenImageCausalConv3d):
    """A ``QwenImageCausalConv3d`` that runs a lone frame, with nothing cached, as its last temporal tap."""

    def forward(self, x: Any, cache_x: Any = None) -> Any:
        kt = self.kernel_size[0]
        pad = self._padding
        if (
            x.shape[2] == 1
            and cache_x is None
            and pad[4] == kt - 1
            and pad[5] == 0
            and self.stride[0] == 1
            and self.dilation[0] == 1
        ):
            if pad[0] == pad[1] and pad[2] == pad[3]:  # symmetric, as diffusers pads: conv2d pads itself
                x2, padding = x[:, :, 0], (pad[2], pad[0])
            else:
                x2, padding = F.pad(x[:, :, 0], pad[:4]), (0, 0)
            y = F.conv2d(
                x2,
                self.weight[:, :, kt - 1],
                self.bias,
                self.stride[1:],
                padding,
                self.dilation[1:],
                self.groups,
            )
            return y.unsqueeze(2)
        return super().forward(x, cache_x)


def use_image_convolutions(vae: Any) -> int:
    """Make ``vae``'s causal 3D convolutions take the 2D path for single frames (weights and state dict unchanged);
    returns how many take it (0 for a VAE that is not Qwen-Image's). Idempotent.

    Example:
        >>> from qwennb.stand_ins import build_tiny_pipeline
        >>> use_image_convolutions(build_tiny_pipeline().vae) > 0
        True
    """
    for m in vae.modules():
        if type(m) is QwenImageCausalConv3d:
            m.__class__ = ImageCausalConv3d
    return image_convolutions(vae)


# The devices the 2D path was measured faster on (exact up to float order), with the VAE untiled: the plan applies
# it there.
MEASURED_ON = ("cpu", "cuda")


def image_convolutions_measured(device: str | None, tiled: bool = False) -> bool:
    """Whether the 2D path was measured faster on ``device`` (a plan's ``"cpu"``, ``"cuda"``, ``"mps"``) with the
    VAE tiled or not, so applied by the plan.

    Example:
        >>> image_convolutions_measured("cuda"), image_convolutions_measured("cuda", tiled=True)
        (True, False)
        >>> image_convolutions_measured("mps")
        False
    """
    return str(device).split(":")[0] in MEASURED_ON and not tiled


def image_convolutions(vae: Any) -> int:
    """How many of ``vae``'s convolutions take the 2D path for single frames (0: diffusers' own everywhere)."""
    return sum(1 for m in vae.modules() if type(m) is ImageCausalConv3d)
