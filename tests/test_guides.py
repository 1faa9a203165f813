"""A new kind of guidance is one class with a `gradient` method, passed as `guides=`: it steers every step."""

import pytest
import torch


class Brighten:
    """A toy guide: the log-likelihood sum(x_t) * scale, whose gradient raises every pixel of the DDIM estimate."""

    def __init__(self, scale: float):
        self.scale, self.calls = scale, 0

    def gradient(self, sample, timestep, alpha, values, eps):
        self.calls += 1
        assert set(values) == {"label"} and eps.shape == sample.shape
        return torch.full_like(sample, self.scale)


def test_a_toy_guide_steers_the_prediction(trained_pipeline, factual_images):
    images, labels = factual_images
    pipe, steps = trained_pipeline, 4
    plain = pipe(images, labels, guidance_scale=0, num_inference_steps=steps, output_type="pt").images
    guide = Brighten(2.0)
    bright = pipe(images, labels, guidance_scale=0, num_inference_steps=steps, output_type="pt", guides=[guide])
    assert guide.calls == steps, "one gradient per prediction step, none in the abduction"
    assert bright.images.mean() > plain.mean() + 0.05, (bright.images.mean(), plain.mean())
    darker = pipe.intervene(pipe.abduct(images, {"label": labels}, num_inference_steps=steps), labels,
                            guidance_scale=0, guides=[Brighten(-2.0)])  # fmt: skip
    assert darker.mean() < plain.mean() - 0.05, "the same guide through abduct / intervene, the other way"


@pytest.mark.parametrize("guides", [Brighten, [lambda x: x], "brighten"])
def test_something_that_is_not_a_list_of_guides_is_refused_before_any_work(trained_pipeline, factual_images, guides):
    images, labels = factual_images
    with pytest.raises(TypeError, match="`guides` takes a list of guides"):
        trained_pipeline(images, labels, guides=guides)
