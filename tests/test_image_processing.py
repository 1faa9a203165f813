import numpy as np
import PIL.Image
import pytest
import torch

from diffscm.image_processing import preprocess_images


def test_pil_rgb_to_grey_and_range():
    image = PIL.Image.new("RGB", (8, 8), (255, 0, 0))
    batch = preprocess_images(image, num_channels=1, sample_size=8)
    assert batch.shape == (1, 1, 8, 8) and batch.dtype == torch.float32
    expected = 2 * np.asarray(image.convert("L"))[0, 0] / 255 - 1
    assert batch[0, 0, 0, 0].item() == pytest.approx(expected, abs=0.01)


def test_numpy_uint8_and_float_agree():
    array = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    from_uint8 = preprocess_images(array, 1, 8)
    from_float = preprocess_images(array.astype(np.float32) / 255, 1, 8)
    torch.testing.assert_close(from_uint8, from_float)
    assert from_uint8.min() >= -1 and from_uint8.max() <= 1


def test_grey_repeated_for_rgb_model_and_lists_stack():
    tensor = torch.rand(1, 8, 8)
    batch = preprocess_images([tensor, tensor], num_channels=3, sample_size=8)
    assert batch.shape == (2, 3, 8, 8)
    torch.testing.assert_close(batch[:, 0], batch[:, 2])


def test_other_sizes_are_resized_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        batch = preprocess_images(PIL.Image.new("L", (20, 12)), 1, 8)
    assert batch.shape == (1, 1, 8, 8)
    assert "Resizing 12x20" in caplog.text


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.full((8, 8), np.nan, dtype=np.float32), ValueError, "NaN"),
        (torch.full((1, 1, 8, 8), float("inf")), ValueError, "NaN or infinite"),
        (torch.rand(1, 4, 8, 8), ValueError, "4 channels"),
        (np.zeros((8, 8, 2)), ValueError, "channels-last"),
        (torch.rand(8), ValueError, r"\(C, H, W\)"),
        (torch.rand(1, 1, 8, 8) * 2 - 1, ValueError, r"\[0, 1\]"),
        (np.full((8, 8), 300, dtype=np.int32), ValueError, r"\[0, 255\]"),
        ("digit.png", TypeError, "PIL image, numpy array"),
        ([], ValueError, "empty"),
        (np.zeros((8, 8), dtype=bool), TypeError, "dtype"),
    ],
)
def test_bad_images_are_rejected(image, error, message):
    with pytest.raises(error, match=message):
        preprocess_images(image, num_channels=1, sample_size=8)
