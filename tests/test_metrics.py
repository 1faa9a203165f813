import pytest
import torch

from diffscm.evaluation import DigitOracle, DigitVAE, counterfactual_latent_divergence
from diffscm.evaluation.metrics import (
    count_calls,
    grey_level_l1,
    knee,
    perceptual_distance,
    random_other_targets,
    realism,
)
from diffscm.evaluation.vae import gaussian_kl, vae_loss


class PixelOracle:
    """A stand-in judge whose embedding is four pixels, so that the Frechet distance is known in closed form."""

    config = type("Config", (), {"sample_size": 8, "in_channels": 1})

    def embed(self, sample: torch.Tensor) -> torch.Tensor:
        return sample.flatten(1)[:, :4]


def test_realism_is_zero_for_the_same_set_and_grows_with_a_shift():
    real = (0.5 + 0.05 * torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(0))).double()
    same, shifted = realism(PixelOracle(), real, real), realism(PixelOracle(), real + 0.1, real)
    assert same["frechet_distance"] == pytest.approx(0, abs=1e-6) and abs(same["kid"]) < 1e-3
    assert shifted["frechet_distance"] == pytest.approx(4 * 0.2**2, rel=1e-3)  # ||mean shift||^2 in [-1, 1] units
    assert shifted["kid"] > 10 * abs(same["kid"])


def test_perceptual_distance_and_l1():
    oracle = DigitOracle(channels=(4, 8)).eval()
    images = torch.rand(3, 1, 28, 28)
    assert perceptual_distance(oracle, images, images) == pytest.approx(0, abs=1e-6)
    assert perceptual_distance(oracle, images, 1 - images) > 0
    assert grey_level_l1(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)) == pytest.approx(255)


def test_random_other_targets_never_equal_the_label():
    labels = torch.arange(10).repeat(50)
    targets = random_other_targets(labels, 10)
    assert (targets != labels).all() and set(targets.tolist()) == set(range(10))


def test_knee_is_the_smallest_scale_near_the_best_flip_rate():
    scales = {str(s): {"guidance_scale": s, "flip_rate": f} for s, f in [(1, 0.5), (5, 0.975), (10, 0.98), (20, 0.96)]}
    assert knee(scales) == 5


def test_count_calls_counts_samples():
    layer = torch.nn.Linear(2, 2)
    with count_calls(layer) as calls:
        layer(torch.zeros(3, 2))
        layer(torch.zeros(5, 2))
    assert calls["samples"] == 8


def test_gaussian_kl_and_cld_behave():
    zero, one = torch.zeros(1, 3), torch.ones(1, 3)
    assert gaussian_kl(zero, zero, zero, zero).item() == pytest.approx(0)
    assert gaussian_kl(one, zero, zero, zero).item() == pytest.approx(1.5)  # 0.5 * sum(mu^2)
    vae = DigitVAE(channels=(4, 8), latent_dim=2).eval()
    images = torch.rand(6, 1, 28, 28)
    labels, targets = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1, 1, 1, 0, 0, 0])
    unchanged = counterfactual_latent_divergence(vae, images, images, labels, targets, images, labels)
    # an unchanged image has div = 0: no target-class image is closer, every factual-class image is as far or farther
    assert torch.allclose(unchanged, torch.log(torch.tensor(1 + torch.e)))


def test_vae_round_trip_shapes_and_loss():
    vae = DigitVAE(channels=(4, 8), latent_dim=2)
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    out = vae(images, generator=torch.Generator().manual_seed(0))
    assert out.reconstruction.shape == images.shape and out.mean.shape == (2, 2)
    assert vae_loss(out, images).item() > 0
    with pytest.raises(ValueError, match="divisible by 4"):
        DigitVAE(sample_size=30)
