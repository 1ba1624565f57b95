"""Squared gradients per example, rebuilt from each layer's input and output gradient (the BackPACK /
Opacus approach), so no (examples x parameters) gradient exists beyond one layer at a time.

`LayerTape` records, through forward hooks, what every Linear and LayerNorm of a module saw and
produced. A backward pass then asks autograd only for the gradients w.r.t. those outputs (never the
parameters), and `SquaredGradSums` turns (input, output gradient) pairs into parameter gradients:
    Linear     W: g_b = Σ_t δ_bt x_btᵀ      bias: Σ_t δ_bt
    LayerNorm  w: g_b = Σ_t δ_bt ⊙ x̂_bt     bias: Σ_t δ_bt      (x̂: the normalised input)
    table rows    g_b[row] = Σ_{t: idx_bt = row} δ_bt
and accumulates one of two reductions of them:
    per-example  F += Σ_b λ_b g_b²     every example's gradient squared on its own
    batchwise    F += W (Σ_b g_b)²     the batch's summed gradient squared once (thesis eq. 3.10)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("per-example", "batchwise")


class LayerTape:
    """Context manager: forward hooks on every Linear and LayerNorm of `root` record
    (module name, module, input, output) for each call, in call order."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.records: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles = []

    def __enter__(self) -> LayerTape:
        for name, module in self.root.named_modules():
            if isinstance(module, nn.Linear | nn.LayerNorm):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module, inputs, output):
            x = inputs[0].detach()
            if isinstance(module, nn.LayerNorm):
                # The weight's gradient needs the normalised input; compute it once per batch, not per backward.
                x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            self.records.append((name, module, x, output))

        return record

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [r[3] for r in self.records]


class RowGroups:
    """Positions of each example that index the same table row (an item seen twice in a sequence).

    idx (B, T) row ids. `first` (B, T) marks the first position of each row id in its example; `sum(g)`
    moves every position's gradient onto that first position, so a square of the result is the
    example's squared row gradient. Positions holding `padding` are left alone (they have no row).
    """

    def __init__(self, idx: torch.Tensor, padding: int = 0):
        T = idx.shape[1]
        same = idx[:, :, None] == idx[:, None, :]  # (B, T, T)
        first_of = same.int().argmax(dim=2)  # (B, T): first position holding the same row id
        real = idx != padding
        self.first = (first_of == torch.arange(T, device=idx.device)) & real
        # Repeats are rare (a user rates a film once), so only they are moved, not the whole tensor.
        self._dup = (~self.first & real).nonzero(as_tuple=True)  # (b, t) of every repeated position
        self._dst = (self._dup[0], first_of[self._dup])

    def sum(self, g: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        if self._dup[0].numel() == 0:
            return g
        out = g.clone()
        out.index_put_(self._dst, g[self._dup], accumulate=True)
        out[self._dup] = 0
        return out


class SquaredGradSums:
    """Running weighted sums of squared gradients per parameter name, in one of the two reductions.

    per-example: Σ_b g_b². An example's weight λ_b is not applied here: the caller scales that
    example's backward cotangent by sqrt(λ_b) — the backward is linear — so every layer's gradients
    arrive already weighted and no layer pays for a multiplication.
    batchwise: weight · (Σ_b g_b)², `weight` given with each call.
    """

    def __init__(self, shapes: dict[str, torch.Size], mode: str, device=None):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        self.batchwise = mode == "batchwise"
        # float64 running sums: thousands of users' terms add up without the order mattering much.
        self.sums = {name: torch.zeros(shape, device=device, dtype=torch.float64) for name, shape in shapes.items()}
        self.touched: set[str] = set()

    def add(self, name: str, value: torch.Tensor, rows: torch.Tensor | slice | None = None) -> None:
        self.touched.add(name)
        value = value.double()
        if rows is None:
            self.sums[name] += value
        elif isinstance(rows, slice):
            self.sums[name][rows] += value
        else:
            self.sums[name].index_add_(0, rows, value)

    def _reduce(self, g_each: torch.Tensor, weight) -> torch.Tensor:
        """g_each (B, ...) one gradient per example -> its contribution to the sum."""
        if self.batchwise:
            return weight * g_each.sum(0).square()
        return g_each.square().sum(0)

    def linear(self, name: str, module: nn.Linear, x: torch.Tensor, g: torch.Tensor, weight=None) -> None:
        """x (B, [T,] in) layer input, g (B, [T,] out) gradient w.r.t. its output."""
        if x.dim() == 3 and x.shape[1] == 1:
            x, g = x[:, 0], g[:, 0]
        if x.dim() == 2:
            if self.batchwise:
                w_grad = weight * (g.T @ x).square()
            else:  # a rank-1 gradient per example squares into a product of squares: no (B, out, in)
                w_grad = g.square().T @ x.square()
            g_bias = g
        else:
            if self.batchwise:
                w_grad = weight * (g.flatten(0, 1).T @ x.flatten(0, 1)).square()
            else:
                w_grad = torch.bmm(g.transpose(1, 2), x).square_().sum(0)  # (B, out, in) -> (out, in)
            g_bias = g.sum(1)
        self.add(f"{name}.weight", w_grad)
        if module.bias is not None:
            self.add(f"{name}.bias", self._reduce(g_bias, weight))

    def layernorm(self, name: str, module: nn.LayerNorm, xhat: torch.Tensor, g: torch.Tensor, weight=None) -> None:
        """xhat (B, [T,] D) normalised input, g (B, [T,] D) gradient w.r.t. the output."""
        if g.dim() == 2:  # one position per example (a sum over an empty dim tuple would sum everything)
            g, xhat = g[:, None], xhat[:, None]
        inner = tuple(range(1, g.dim() - 1))
        if module.weight is not None:
            self.add(f"{name}.weight", self._reduce((g * xhat).sum(inner), weight))
        if module.bias is not None:
            self.add(f"{name}.bias", self._reduce(g.sum(inner), weight))

    def layers(self, records, grads, weight=None) -> None:
        """Every recorded Linear/LayerNorm call with the gradient w.r.t. its output (None = no gradient)."""
        for (name, module, x, _), g in zip(records, grads):
            if g is None:
                continue
            if isinstance(module, nn.Linear):
                self.linear(name, module, x, g, weight)
            else:
                self.layernorm(name, module, x, g, weight)

    def table_rows(self, name: str, rows: slice, g: torch.Tensor, weight=None) -> None:
        """Table rows that are distinct and shared by the batch (a position table): g (B, T, D) is each
        example's gradient of those rows."""
        self.add(name, self._reduce(g, weight), rows=rows)
