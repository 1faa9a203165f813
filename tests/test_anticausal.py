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


def test_predictor_heads_condition_and_predict_in_order():
    from diffscm import AntiCausalPredictor

    predictor = AntiCausalPredictor(
        sample_size=8,
        parents={
            "thickness": {"type": "continuous", "range": [0.5, 6.0], "conditions": ["intensity"]},
            "intensity": {"type": "continuous", "range": [64.0, 255.0]},
            "digit": {"type": "categorical", "num_classes": 10},
        },
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()
    assert predictor.order.index("intensity") < predictor.order.index("thickness")
    sample = torch.randn(3, 1, 8, 8)
    outputs = predictor(sample, 5, conditions={"intensity": torch.tensor([70.0, 150.0, 250.0])}).outputs
    assert outputs["digit"].shape == (3, 10) and outputs["thickness"].shape == (3, 2)
    low, high = (
        predictor(sample, 5, conditions={"intensity": 64.0}),
        predictor(sample, 5, conditions={"intensity": 255.0}),
    )
    assert not torch.allclose(low.outputs["thickness"], high.outputs["thickness"]), "the condition must matter"
    with pytest.raises(ValueError, match="conditioned on"):
        predictor(sample, 5)
    estimates = predictor.predict(sample, 0)
    assert set(estimates) == {"thickness", "intensity", "digit"} and estimates["digit"].dtype == torch.long
    values = {"thickness": 2.0, "intensity": 100.0, "digit": torch.tensor([1, 2, 3])}
    log_likelihood = predictor.log_likelihood(sample, 0, values)
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in log_likelihood.values())


def test_predictor_save_load_round_trip(tmp_path):
    from conftest import tiny_predictor

    from diffscm import AntiCausalPredictor

    predictor = tiny_predictor().eval()
    predictor.save_pretrained(tmp_path)
    loaded = AntiCausalPredictor.from_pretrained(tmp_path).eval()
    sample = torch.randn(2, 1, 8, 8)
    values = {"brightness": 0.7, "position": 1}
    for name, value in predictor.log_likelihood(sample, 3, values).items():
        assert torch.equal(value, loaded.log_likelihood(sample, 3, values)[name])


@pytest.mark.parametrize(
    ("parents", "message"),
    [
        (None, "at least one parent"),
        ({"a": {"type": "ordinal"}}, "type 'ordinal'"),
        ({"a": {"type": "categorical", "num_classes": 1}}, "num_classes >= 2"),
        ({"a": {"type": "continuous", "range": [1.0, 1.0]}}, "low < high"),
        (
            {"a": {"type": "continuous", "range": [0, 1], "conditions": ["b"]}, "b": {"type": "categorical",
             "num_classes": 2}},
            "other continuous parents",
        ),
        (
            {"a": {"type": "continuous", "range": [0, 1], "conditions": ["b"]},
             "b": {"type": "continuous", "range": [0, 1], "conditions": ["a"]}},
            "cycle",
        ),
    ],
)  # fmt: skip
def test_bad_predictor_config(parents, message):
    from diffscm import AntiCausalPredictor

    with pytest.raises(ValueError, match=message):
        AntiCausalPredictor(parents=parents)
