import pytest
import torch
from conftest import tiny_classifier

from diffscm import AntiCausalClassifier


def test_logits_shape_and_timestep_conditioning():
    classifier = tiny_classifier(num_classes=5).eval()
    sample = torch.randn(3, 1, 8, 8)
    early, late = classifier(sample, 0).logits, classifier(sample, 900).logits
    assert early.shape == (3, 5)
    assert not torch.allclose(early, late), "the timestep must change the prediction"
    per_sample = classifier(sample, torch.tensor([0, 0, 900])).logits
    torch.testing.assert_close(per_sample[:2], early[:2])
    torch.testing.assert_close(per_sample[2], late[2])
    assert classifier(sample, 0, return_dict=False)[0].shape == (3, 5)


def test_save_load_round_trip(tmp_path):
    classifier = tiny_classifier(channels=3, size=16, num_classes=4).eval()
    classifier.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = AntiCausalClassifier.from_pretrained(tmp_path).eval()
    sample = torch.randn(2, 3, 16, 16)
    assert torch.equal(classifier(sample, 10).logits, loaded(sample, 10).logits)
    assert loaded.config.num_classes == 4


def test_gradient_reaches_the_input():
    classifier = tiny_classifier()
    sample = torch.randn(2, 1, 8, 8, requires_grad=True)
    classifier(sample, 5).logits[:, 1].sum().backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "config, message",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"down_block_types": ("DownBlock2D",), "block_out_channels": (8, 16)}, "same length"),
    ],
)
def test_bad_config(config, message):
    with pytest.raises(ValueError, match=message):
        AntiCausalClassifier(**config)
