"""Where models sit relative to each other: the plane through three parameter vectors, and samples from
each model's Laplace posterior N(θ, (s·F + d)⁻¹) built from its diagonal Fisher (thesis fig. 4.5)."""

from __future__ import annotations

import torch


def flatten(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].detach().reshape(-1).to(torch.float64) for n in names])


class Plane:
    """Origin at `a`; x along b − a; y along the part of c − a orthogonal to it (Gram–Schmidt)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
        self.origin = a
        u = b - a
        if u.norm() == 0:
            raise ValueError("the first two models are identical: they span no plane")
        self.u = u / u.norm()
        v = (c - a) - ((c - a) @ self.u) * self.u
        if v.norm() == 0:
            raise ValueError("the three models lie on one line: they span no plane")
        self.v = v / v.norm()

    def coords(self, x: torch.Tensor) -> tuple[float, float]:
        d = x - self.origin
        return float(d @ self.u), float(d @ self.v)


def laplace_samples(theta: torch.Tensor, fisher: torch.Tensor, n: int, scale: float, damping: float,
                    generator: torch.Generator):
    """n draws of θ + ε / sqrt(scale·F + damping), ε ~ N(0, I). `scale` is the number of examples the
    Fisher averaged over (the posterior precision grows with the data); `damping` is a unit-Gaussian
    prior's precision, which keeps zero-Fisher directions finite."""
    if scale <= 0 or damping <= 0:
        raise ValueError("scale and damping must be > 0")
    std = (scale * fisher.to(torch.float64) + damping).rsqrt()
    for _ in range(n):
        yield theta + torch.randn(theta.shape, generator=generator, dtype=torch.float64) * std
