"""``fit_image``: one image to the model's square input, as timm's eval transform with ``crop_pct=1.0`` does it.

Resize the shorter side to ``size`` (bicubic, antialiased) and take the centre ``size x size`` crop: the
``Resize(size) + CenterCrop(size)`` of ``timm.data.create_transform(size, crop_pct=1.0, interpolation='bicubic')``,
which is also what an export's ``pretrained_cfg`` tells timm to do at evaluation.
"""
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ['fit_image']


def fit_image(image: Tensor, size: int) -> Tensor:
    """uint8 ``[C, H, W]`` -> uint8 ``[C, size, size]``; an image already that size is returned untouched (so a
    streamed image equals the same image decoded into memory, bit for bit)."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    image = F.resize(image, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(image, [size, size])
