import pytest
import torch

from merging.geometry import Plane, flatten, laplace_samples


def test_plane_places_the_three_models_and_their_mean():
    a, b, c = torch.tensor([1.0, 0, 0, 0]), torch.tensor([4.0, 0, 0, 0]), torch.tensor([1.0, 2, 0, 5])
    plane = Plane(a, b, c)
    assert plane.coords(a) == (0.0, 0.0)
    assert plane.coords(b) == pytest.approx((3.0, 0.0))
    assert plane.coords(c) == pytest.approx((0.0, (4 + 25) ** 0.5))
    mean = (a + b + c) / 3
    assert plane.coords(mean) == pytest.approx((1.0, (29 ** 0.5) / 3))
    with pytest.raises(ValueError, match="one line"):
        Plane(a, b, a + 2 * (b - a))


def test_flatten_follows_the_given_name_order():
    s = {"x": torch.tensor([[1.0, 2.0]]), "y": torch.tensor([3.0])}
    assert flatten(s, ["y", "x"]).tolist() == [3.0, 1.0, 2.0]


def test_laplace_samples_have_the_posterior_spread():
    theta = torch.zeros(4, dtype=torch.float64)
    fisher = torch.tensor([0.0, 1.0, 3.0, 99.0])
    draws = torch.stack(list(laplace_samples(theta, fisher, 4000, scale=1.0, damping=1.0,
                                             generator=torch.Generator().manual_seed(0))))
    expected = (fisher + 1.0).rsqrt().to(torch.float64)
    torch.testing.assert_close(draws.std(dim=0), expected, rtol=0.05, atol=0)
    torch.testing.assert_close(draws.mean(dim=0), theta, rtol=0, atol=0.05)
