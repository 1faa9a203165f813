"""Anderson acceleration of the abduction's fixed point x_t = step^-1(x_next, eps(x_t, t)), as in AIDI (Pan et al.,
"Effective Real Image Editing with Accelerated Iterative Diffusion Inversion", ICCV 2023)."""

import torch


def anderson_mix(tried: list[torch.Tensor], mapped: list[torch.Tensor]) -> torch.Tensor:
    """
    The next iterate of the fixed point x = g(x) from the passes so far (`tried[i]` = x_i, `mapped[i]` = g(x_i)), per
    sample: Anderson acceleration with memory one (Walker & Ni 2011), g_k - gamma (g_k - g_(k-1)) with the gamma that
    minimises the mixed residual ||f_k - gamma (f_k - f_(k-1))||, f = g(x) - x. One pass gives g(x_0), the plain
    iteration. Measured: a longer memory stalled on large DDIM steps, where the map is far from linear
    (`docs/abduction-acceleration.md`).
    """
    if len(mapped) == 1:
        return mapped[-1]
    (x_before, x_last), (g_before, g_last) = tried[-2:], mapped[-2:]
    residual = (g_last - x_last).flatten(1).double()
    change = residual - (g_before - x_before).flatten(1).double()
    gamma = (change * residual).sum(1) / (change * change).sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    return g_last - gamma.view(-1, *[1] * (g_last.dim() - 1)).to(g_last.dtype) * (g_last - g_before)
