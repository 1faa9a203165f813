import torch
from diffscm.pipelines.fixed_point import anderson_mix


def passes(g, start: torch.Tensor, count: int, accelerate: bool = True) -> torch.Tensor:
    """`count` evaluations of the map `g` from `start`, each iterate mixed by Anderson (or plain x = g(x))."""
    tried, mapped, guess = [], [], start
    for _ in range(count):
        tried.append(guess), mapped.append(g(guess))
        guess = anderson_mix(tried, mapped) if accelerate else mapped[-1]
    return guess


def test_one_pass_is_the_plain_iteration():
    x, gx = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert anderson_mix([x], [gx]) is gx


def test_two_passes_solve_an_affine_map_per_sample():
    """On g(x) = a x + b each sample's secant is exact: its own fixed point b / (1 - a), whatever the others'."""
    a = torch.tensor([0.9, -0.5, 0.99]).view(3, 1, 1, 1)
    b = torch.tensor([1.0, 2.0, -0.3]).view(3, 1, 1, 1)
    solution = passes(lambda x: a * x + b, torch.zeros(3, 1, 2, 2), 2)
    torch.testing.assert_close(solution, (b / (1 - a)).expand(3, 1, 2, 2), rtol=1e-5, atol=1e-5)


def test_a_slow_linear_contraction_converges_faster_than_plain_iteration():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    matrix = q @ torch.diag(torch.linspace(0.5, 0.97, 16)) @ q.T  # contraction rate up to 0.97
    offset = torch.randn(2, 16, generator=generator)
    fixed = torch.linalg.solve(torch.eye(16) - matrix, offset.T).T

    def g(x):
        return (x.flatten(1) @ matrix.T + offset).view_as(x)

    start = torch.zeros(2, 1, 4, 4)
    error = {
        name: (passes(g, start, 16, name == "anderson").flatten(1) - fixed).norm() for name in ("anderson", "plain")
    }
    assert error["anderson"] < 0.35 * error["plain"], error


def test_converged_passes_stay_finite_and_fixed():
    x = torch.randn(2, 1, 3, 3)
    mixed = anderson_mix([x, x, x], [x, x, x])
    assert torch.isfinite(mixed).all() and torch.equal(mixed, x)
