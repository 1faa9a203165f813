"""Checked conversion of user images (PIL, numpy, torch; diffusers' conventions) to model tensors in [-1, 1]."""

import logging
import math

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PipelineImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def preprocess_images(image: PipelineImageInput, num_channels: int, sample_size: int) -> torch.Tensor:
    """
    Turn `image` into a float32 batch `(B, num_channels, sample_size, sample_size)` in [-1, 1].

    Accepted: a PIL image (any mode), a numpy array channels-last `(H, W)`, `(H, W, C)` or `(B, H, W, C)`, a torch
    tensor channels-first `(C, H, W)` or `(B, C, H, W)`, or a list of any of these. Floats must lie in [0, 1],
    uint16 in [0, 65535] (16-bit images, also PIL's), other integers in [0, 255]; transparency is composited over
    black, and a photo's EXIF orientation applied. RGB is converted to grey for a 1-channel model (luma) and grey
    repeated for a 3-channel one; images of another size are resized (bilinear, antialiased) with a warning.
    """
    return unit_images(image, num_channels, sample_size).mul(2).sub(1)


def unit_images(image: PipelineImageInput, num_channels: int, sample_size: int) -> torch.Tensor:
    """[`preprocess_images`] in [0, 1] (diffusers' convention for image tensors): the images as a model sees them."""
    images = image if isinstance(image, (list, tuple)) else [image]
    if len(images) == 0:
        raise ValueError("`image` is empty: pass at least one image.")
    return torch.cat([_resize(_to_unit_tensor(img, num_channels), sample_size) for img in images])


def _to_unit_tensor(image, num_channels: int) -> torch.Tensor:
    """One input -> float32 `(B, C, H, W)` in [0, 1] with `num_channels` channels."""
    kind = "numpy" if isinstance(image, np.ndarray) else "torch"
    if isinstance(image, PIL.Image.Image):
        kind = f"PIL mode {image.mode!r}"
        image = _pil_to_array(PIL.ImageOps.exif_transpose(image), num_channels)  # upright, as viewers show it
    if isinstance(image, np.ndarray):
        tensor = _numpy_to_channels_first(image)
    elif isinstance(image, torch.Tensor):
        if image.is_meta:
            raise ValueError("The image tensor is on the meta device: it holds no data.")
        tensor = image.detach().cpu()
        if tensor.layout != torch.strided:  # sparse
            tensor = tensor.to_dense()
        if tensor.dtype in (torch.uint32, torch.uint64):
            tensor = tensor.to(torch.int64)
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ValueError(f"A torch image must be (C, H, W) or (B, C, H, W); got shape {tuple(image.shape)}.")
        if tensor.shape[1] not in (1, 3, 4) and tensor.shape[-1] in (1, 3, 4):
            raise ValueError(
                f"A torch image is channels-first (C, H, W); shape {tuple(image.shape)} looks channels-last: pass "
                "image.permute(2, 0, 1) (or (0, 3, 1, 2) for a batch), or a numpy array, which is channels-last."
            )
    else:
        nested = " (a nested list: pass a flat list of images)" if isinstance(image, list | tuple) else ""
        raise TypeError(
            "`image` must be a PIL image, numpy array, torch tensor or a list of them; got "
            f"{type(image).__name__}{nested}."
        )
    return _match_channels(_to_unit_range(tensor, kind), num_channels)


def _pil_to_array(image: PIL.Image.Image, num_channels: int) -> np.ndarray:
    """Any PIL mode as a channels-last array in [0, 1] (floats) or [0, 255] (uint8): 16- and 32-bit integer images
    by their real range, float ("F") images as floats, and transparency composited over black (the digits'
    background); an image whose colour channels are empty and whose content is only its alpha is refused."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.float64)
        return (array / 65535)[..., None].repeat(num_channels, axis=-1).astype(np.float32)
    if image.mode == "I":  # 32-bit integers, read as numpy reads an int32 array: 0..255
        return np.asarray(image, dtype=np.int32)[..., None].repeat(num_channels, axis=-1)
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiplied first
        image = image.convert(image.mode.upper())
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)[..., None].repeat(num_channels, axis=-1)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
        composite, alpha = rgba[..., :3] * rgba[..., 3:], rgba[..., 3]
        if np.ptp(composite) == 0 and np.ptp(alpha) > 0:
            raise ValueError(
                "The image's colour channels are empty: its content is only in the alpha channel. Pass "
                "image.getchannel('A') if the alpha is the digit."
            )
        image = PIL.Image.fromarray(np.round(composite * 255).astype(np.uint8))
    return np.asarray(image.convert("L" if num_channels == 1 else "RGB"))


def _numpy_to_channels_first(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "biufc":
        raise TypeError(f"A numpy image must hold numbers; got dtype {array.dtype}. Use uint8 or float32.")
    if array.dtype in (np.uint32, np.uint64):
        array = array.astype(np.int64)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        if array.shape[-1] not in (1, 3):
            raise ValueError(
                f"A 3-D numpy image must be channels-last (H, W, C) with C = 1 or 3; got shape {array.shape}. "
                "Add a channel axis for a batch of grey images: array[..., None]."
            )
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"A numpy image must be (H, W), (H, W, C) or (B, H, W, C); got shape {array.shape}.")
    return torch.tensor(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def _to_unit_range(tensor: torch.Tensor, kind: str = "torch") -> torch.Tensor:
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"Image dtype {tensor.dtype} is not supported: use uint8 in [0, 255] or float in [0, 1].")
    if tensor.numel() == 0:
        raise ValueError(f"Empty image of shape {tuple(tensor.shape)}.")
    if tensor.is_floating_point():
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise ValueError("The image contains NaN or infinite pixel values.")
        low, high = 0, 1
    elif tensor.dtype == torch.uint16:
        tensor, low, high = tensor.to(torch.int32), 0, 65535
    else:
        low, high = 0, 255
    smallest, largest = tensor.min().item(), tensor.max().item()
    if smallest < low - 1e-3 or largest > high + 1e-3:
        if tensor.is_floating_point() and smallest >= 0 and largest <= 255:
            hint = "Divide 0..255 values by 255."
        elif tensor.is_floating_point() and smallest >= -1 and largest <= 1:
            hint = "Rescale [-1, 1] values with (x + 1) / 2."
        else:
            hint = "Use uint8 in [0, 255], uint16 in [0, 65535] or floats in [0, 1]."
        raise ValueError(
            f"Pixel values of a {kind} image of {str(tensor.dtype).removeprefix('torch.')} must lie in [{low}, "
            f"{high}] (diffusers' convention); got [{smallest:.3g}, {largest:.3g}]. {hint}"
        )
    return (tensor.float() / high).clamp(0, 1)


def _match_channels(tensor: torch.Tensor, num_channels: int) -> torch.Tensor:
    channels = tensor.shape[1]
    if channels == num_channels:
        return tensor
    if channels == 3 and num_channels == 1:
        weights = torch.tensor(_LUMA).view(1, 3, 1, 1)
        return (tensor * weights).sum(dim=1, keepdim=True)
    if channels == 1 and num_channels == 3:
        return tensor.expand(-1, 3, -1, -1)
    raise ValueError(
        f"The image has {channels} channels but the model takes {num_channels}; only 1 <-> 3 conversion is automatic."
    )


def _resize(tensor: torch.Tensor, sample_size: int) -> torch.Tensor:
    height, width = tensor.shape[-2:]
    if (height, width) == (sample_size, sample_size):
        return tensor
    logger.warning(f"Resizing {height}x{width} input to the model's {sample_size}x{sample_size}.")
    return F.interpolate(tensor, size=(sample_size, sample_size), mode="bilinear", antialias=True).clamp(0, 1)


def random_affine(
    images: torch.Tensor,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random rotation, scaling and shift of a batch in [-1, 1] (background -1), one draw per image from
    `generator` (differentiable in `images`)."""
    batch = images.shape[0]
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(degrees)
    factor = torch.rand(batch, generator=generator) * (scale[1] - scale[0]) + scale[0]
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * translate * 2
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images), images.shape, align_corners=False)
    return F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1
