"""The two Fisher computations of SPEC §5 over plain lists of sequences: per-example and batchwise.

For a history s with last-position output z (after the head), logits l = z Eᵀ + b over the items
(E: rows 1..N of the tied item table) and p = softmax(l):
    ∂ log p(v|s) / ∂b   = e_v − p
    ∂ log p(v|s) / ∂E_c = (δ_vc − p_c) z      output side: a rank-1 product, in closed form below
    ∂ log p(v|s) / ∂z   = E_v − Σ_c p_c E_c =: u_v
and every body parameter (and the input side of E) receives Jᵀ u_v, J = ∂z/∂θ, by one backward pass.

per-example: F = Σ_s Σ_v w_v (∇ log p(v|s))². For the body, Σ_v w_v (Jᵀu_v)² = diag(Jᵀ C J) with
C = Σ_v w_v u_v u_vᵀ, a D x D matrix: with C = Σ_k λ_k q_k q_kᵀ (eigenvectors) it is Σ_k λ_k (Jᵀq_k)².
So a sequence costs min(K, D) backward cotangents, never K — `exact` over 3,706 items needs 64 (D),
not 3,706. With K <= D the cotangents are the u_v themselves (times sqrt(w_v)). Row c of E mixes both sides:
    Σ_v w_v ((δ_vc − p_c) z + a_c(u_v))² = coef_c z² + 2 z ⊙ a_c(m_c) + Σ_k λ_k a_c(q_k)²
with a_c(·) the input-side row gradient (linear in the cotangent), coef_c = Σ_v w_v (δ_vc − p_c)² and
m_c = Σ_v w_v (δ_vc − p_c) u_v; only rows of items in the sequence have a_c ≠ 0.

batchwise (thesis eq. 3.10): per batch and selection rank r, G_r = ∇ Σ_i log p(v_ir|s_i), and
F += (Σ_i w_ir) G_r². One backward per rank, the cotangent of sequence i being u_{v_ir}. With one
sequence per batch it equals per-example; with more, cross terms between sequences enter.
`exact` ranks items by id (rank r = item r+1 for every sequence).

Both sum over sequences; the caller divides by |U|. Everything runs in eval mode (no dropout): a
Fisher describes the deployed model, and dropout would make it a random variable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from merging.item_selection import select_items
from merging.per_example import LayerTape, RowGroups, SquaredGradSums
from models.backbone import SeqRecModel
from models.batching import length_batches, pad_left

COMPUTATIONS = ("per-example", "batchwise")
ITEM_TABLE, POS_TABLE, OUT_BIAS = "item_emb.weight", "pos_emb.weight", "out_bias"

Progress = Callable[[str, float], None]


@contextmanager
def _fisher_mode(model: SeqRecModel):
    """eval() and no parameter gradients, restored afterwards. Only the item table keeps requires_grad,
    so that autograd records the graph from the embedding lookup on; the backward asks for activation
    gradients only and never computes a parameter's."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(p is model.item_emb.weight)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def forward_last(model: SeqRecModel, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, D) = model.project(h_last): the head output that scores the next item, with the final
    block computing the last position only (encode(last_only=True)); e (B, T, D): the embedding sum
    (emb_ln's input), where the backward stops — the tables' gradients are built from it by hand."""
    seen = {}
    hook = model.emb_ln.register_forward_pre_hook(lambda module, inputs: seen.setdefault("e", inputs[0]))
    try:
        z = model.project(model.encode(tokens, last_only=True)[:, -1])
    finally:
        hook.remove()
    return z, seen["e"]


class _Batch:
    """One forward pass shared by every cotangent of the batch."""

    def __init__(self, model: SeqRecModel, seqs: Sequence[np.ndarray]):
        cfg = model.cfg
        device = model.item_emb.weight.device
        width = min(max(len(s) for s in seqs), cfg.max_len - (0 if model.causal else 1))
        self.tokens = model.inference_tokens(pad_left(seqs, width).to(device))  # (B, T)
        self.tape = LayerTape(model)
        with self.tape:
            self.z_graph, self.e = forward_last(model, self.tokens)
        with torch.no_grad():  # the output side is closed-form: no graph beyond z
            self.z = self.z_graph.detach()  # (B, D)
            self.items = model.item_emb.weight[1 : cfg.n_items + 1].detach()  # (N, D)
            self.probs = torch.softmax(model.item_logits(self.z), dim=-1)  # (B, N)
            self.zbar = self.probs @ self.items  # (B, D): Σ_c p_c E_c
        # The position table's rows this batch touches, and where each token's gradient lands in them.
        T = self.tokens.shape[1]
        self.pos_index = model.positions(self.tokens)  # (B, T), or (1, T) when shared by the batch
        self.pos_rows = slice(cfg.max_len - T, cfg.max_len) if cfg.positions == "end" else slice(0, T)
        self._wanted = self.tape.outputs + [self.e]

    def backward(self, cot: torch.Tensor) -> tuple[list, torch.Tensor]:
        """cot (B, D) gradient at z -> (gradients w.r.t. each recorded layer output, gradient w.r.t. e)."""
        grads = torch.autograd.grad(self.z_graph, self._wanted, cot, retain_graph=True, allow_unused=True)
        ge = grads[-1] if grads[-1] is not None else torch.zeros_like(self.e)
        return list(grads[:-1]), ge

    def pos_grads(self, ge: torch.Tensor) -> torch.Tensor:
        """ge (B, T, D) per token -> (B, T, D) per row of `pos_rows`. With "start" positions a row's
        tokens sit at different columns; padding lands on row 0 with a zero gradient (nothing reads it)."""
        if self.pos_index.shape[0] == 1:  # "end": column t is row start + t for every example
            return ge
        return torch.zeros_like(ge).scatter_add_(1, self.pos_index[..., None].expand_as(ge), ge)


def _per_example(acc: SquaredGradSums, b: _Batch, cols: torch.Tensor, w: torch.Tensor, step) -> None:
    z, p, E = b.z, b.probs, b.items
    K, (N, D) = cols.shape[1], E.shape
    wd = torch.zeros_like(p).scatter_add_(1, cols, w)  # (B, N) total weight on each item
    coef = wd * (1 - 2 * p) + p.square() * w.sum(1, keepdim=True)  # (B, N) Σ_v w_v (δ_vc − p_c)²
    acc.add(OUT_BIAS, coef.sum(0))
    acc.add(ITEM_TABLE, coef.T @ z.square(), rows=slice(1, N + 1))  # output side of every item row

    tok = b.tokens
    is_item = (tok >= 1) & (tok <= N)
    c = (tok - 1).clamp(0, N - 1)  # (B, T) column of each token (meaningful where is_item)
    pc = p.gather(1, c)  # (B, T)
    U = E[cols] - b.zbar[:, None]  # (B, K, D): u_v for each selected item
    # Cotangents l_k with C = Σ_k l_k l_kᵀ, and γ: the coordinates of m_c in them (m_c = Σ_k γ_k l_k).
    if K <= D:
        root_w = w.sqrt()
        cot = root_w[..., None] * U  # (B, K, D): l_k = sqrt(w_k) u_k
        gamma = root_w[:, None, :] * ((cols[:, None, :] == c[:, :, None]).to(p.dtype) - pc[:, :, None])  # (B, T, K)
    else:
        U64, w64 = U.double(), w.double()
        C = torch.einsum("bk,bkd,bke->bde", w64, U64, U64)  # (B, D, D)
        lam, Q = torch.linalg.eigh(C)  # Q's columns: orthonormal eigenvectors
        S = torch.einsum("bk,bkd->bd", w64, U64)  # Σ_v w_v u_v (0 for exact: Σ_v p_v u_v = 0)
        u_tok = (E[c] - b.zbar[:, None]).double()  # (B, T, D): u_c for each token
        m = wd.gather(1, c).double()[..., None] * u_tok - pc.double()[..., None] * S[:, None]
        # m_c lies in C's range, so its coordinate on q_k is at most ~sqrt(λ_k) (Cauchy-Schwarz): the
        # division is safe, and directions C does not span (λ ~ rounding error) carry nothing.
        root = lam.clamp_min(0).sqrt()
        inv_root = torch.where(lam > 1e-12 * lam[:, -1:], 1 / root, torch.zeros_like(root))
        gamma = (torch.einsum("btd,bdk->btk", m, Q) * inv_root[:, None, :]).to(p.dtype)
        cot = (Q * root[:, None, :]).transpose(1, 2).to(p.dtype)  # (B, D, D): l_k = sqrt(λ_k) q_k
    gamma = gamma * is_item[..., None]  # the [MASK] row has no output side

    groups = RowGroups(tok, padding=0)
    sq = torch.zeros_like(b.e)  # (B, T, D) Σ_k a(l_k)² on each token's first position
    cross = torch.zeros_like(b.e)  # (B, T, D) a(m_c) = Σ_k γ_k a(l_k)
    for k in range(cot.shape[1]):
        grads, ge = b.backward(cot[:, k])
        acc.layers(b.tape.records, grads)
        acc.table_rows(POS_TABLE, b.pos_rows, b.pos_grads(ge))
        a = groups.sum(ge)
        sq += a.square()
        cross += gamma[:, :, k, None] * a
        step((k + 1) / cot.shape[1])
    keep = groups.first  # one position per distinct real token (padding_idx=0 never gets a gradient)
    acc.add(ITEM_TABLE, (sq + 2 * z[:, None] * cross)[keep], rows=tok[keep])


def _batchwise(acc: SquaredGradSums, b: _Batch, cols: torch.Tensor, w: torch.Tensor, step) -> None:
    z, p, E = b.z, b.probs, b.items
    N = E.shape[0]
    mean_side = p.T @ z  # (N, D) Σ_i p_ic z_i: the part of Σ_i ∂/∂E_c shared by every rank
    p_sum = p.sum(0)  # (N,)
    tok = b.tokens.reshape(-1)
    real = tok != 0
    K = cols.shape[1]
    for r in range(K):
        v = cols[:, r]  # (B,)
        weight = w[:, r].sum()
        grads, ge = b.backward(E[v] - b.zbar)
        acc.layers(b.tape.records, grads, weight)
        acc.table_rows(POS_TABLE, b.pos_rows, b.pos_grads(ge), weight)
        acc.add(OUT_BIAS, weight * (torch.bincount(v, minlength=N).to(p.dtype) - p_sum).square())
        g_table = E.new_zeros(N + 2, E.shape[1])  # (vocab, D): the batch's summed table gradient
        g_table[1 : N + 1] = -mean_side
        g_table.index_add_(0, v + 1, z)
        g_table.index_add_(0, tok[real], ge.reshape(-1, ge.shape[-1])[real])
        acc.add(ITEM_TABLE, weight * g_table.square())
        step((r + 1) / K)


def compute_fisher(model: SeqRecModel, sequences: Sequence[Sequence[int]], targets: Sequence[int] | None = None,
                   *, sampling: str, n: int | None = None, computation: str = "per-example", batch_size: int = 64,
                   seed: int = 0, keys: Sequence[int] | None = None, progress: Progress | None = None,
                   ) -> dict[str, torch.Tensor]:
    """Σ over the sequences of their Fisher terms (not yet divided by their number), one float32 tensor
    per state_dict entry. sequences: histories s_i (internal item ids, non-empty); targets: the item
    that followed each (needed for sampling='target'); keys: per-sequence seeds of random draws
    (default: the position in the list)."""
    if computation not in COMPUTATIONS:
        raise ValueError(f"unknown computation {computation!r}; known: {', '.join(COMPUTATIONS)}")
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one item")
    keys = np.arange(len(seqs)) if keys is None else np.asarray(keys)
    tgt = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.int64))
    names = dict(model.named_parameters())
    if set(names) != set(model.state_dict()):
        raise RuntimeError("the model has buffers or tied names the Fisher does not know how to place")
    param = model.item_emb.weight
    acc = SquaredGradSums({k: v.shape for k, v in names.items()}, computation, param.device)
    run_batch = _per_example if computation == "per-example" else _batchwise
    total, done = len(seqs), 0
    with _fisher_mode(model):
        for idx in length_batches([len(s) for s in seqs], batch_size):
            b = _Batch(model, [seqs[j] for j in idx])
            cols, w = select_items(b.probs, sampling, n, None if tgt is None else tgt[torch.as_tensor(idx)],
                                   keys[idx], seed)

            def step(frac, _done=done, _size=len(idx)):
                if progress is not None:
                    progress("fisher", (_done + frac * _size) / total)

            run_batch(acc, b, cols.to(param.device), w.to(param.dtype), step)
            done += len(idx)
    missing = set(names) - acc.touched
    if seqs and missing:
        raise RuntimeError(f"no Fisher rule reached {sorted(missing)}")
    return {k: acc.sums[k].float() for k in model.state_dict()}
