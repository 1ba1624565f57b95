"""Cross-entropy over every item, computed in row chunks that stay in cache.

The plain way (`F.cross_entropy(z @ E.T + b, y)`) writes an (M, N) logit matrix to memory, then reads
and writes it again for the log-softmax, its backward, the bias gradient and two gradient products:
on ml-1m (M ~ 25,000 positions per batch, N = 3,416 items) that is ~350 MB per pass and the output
layer took about two thirds of a training step on this 2-core CPU (torch.profiler: log-softmax and its
backward 1.4 s, the three (M, N) products 2.2 s, fills and adds 1 s of a 6.5 s step). Here each chunk
of rows is scored, normalised and turned into its gradients while its logits are still in cache, and
the gradients are kept for the backward: the loss is exactly the same, its gradient exactly the same up
to float summation order.

`mm_dtype` (bfloat16 under mixed precision) is the type the three products run in. As under autocast,
the logits leave the product rounded to bfloat16 (torch has no float32-output bfloat16 product on CPU);
they are widened to float32 for the softmax, and the gradients are accumulated in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logit entries per chunk (64 MB): on ml-1m (3,416 items, 20,000 rows, 2 threads) a step took 2.2 s in
# chunks of 4,096 rows, 2.5 s of 2,048, 2.9 s of 1,024 and 3.9 s unchunked — per-call overheads dominate
# small chunks on this CPU; the cap keeps a chunk's memory bounded on larger catalogues.
CHUNK_ENTRIES = 1 << 24


class _ChunkedItemCE(torch.autograd.Function):
    """The loss summed over rows, its gradients formed chunk by chunk in the forward.

    Two ways to name a row's true item: `labels` (a column of `table`: the full softmax), or `own` (a
    logit of its own, outside the table: the sampled softmax, where the table holds the shared negatives;
    `exclude` then names a column per row, or -1, whose logit is dropped because that negative is the
    row's own target)."""

    @staticmethod
    def forward(ctx, z, table, bias, own, labels, exclude, chunk, mm_dtype):
        # z (M, D) outputs, table (N, D) candidate rows, bias (N,), own (M,) or None, labels (M,) columns
        # in 0..N-1 (when own is None), exclude (M,) columns or -1 (or None)
        M = z.shape[0]
        low = _lowers(z, mm_dtype)
        # The products' operands, cast once; the float32 originals stay for the softmax and the sums.
        z_mm, table_mm = (z.to(mm_dtype), table.to(mm_dtype)) if low else (z, table)
        need = ctx.needs_input_grad
        dz = torch.empty_like(z) if need[0] else None
        dtable = torch.zeros_like(table) if need[1] else None
        dbias = torch.zeros_like(bias) if need[2] else None
        down = torch.empty_like(own) if own is not None and need[3] else None
        total = z.new_zeros(())
        ones = z.new_ones(min(chunk, M))
        for start in range(0, M, chunk):
            stop = min(M, start + chunk)
            zc = z_mm[start:stop]
            rows = torch.arange(stop - start, device=z.device)
            if low:
                # Every product at one fixed shape: the last chunk is padded with zero rows, because a new
                # shape costs oneDNN ~4 ms of set-up on CPU, more than the bfloat16 product saves.
                zc = F.pad(zc, (0, 0, 0, chunk - len(rows)))
                logits = torch.mm(zc, table_mm.T)[: len(rows)].to(z.dtype).add_(bias)  # (c, N), float32
            else:
                logits = torch.addmm(bias, zc, table.T)  # (c, N)
            if exclude is not None:
                ex = exclude[start:stop]
                hit = (ex >= 0).nonzero().squeeze(1)
                logits[hit, ex[hit]] = float("-inf")
            top = logits.amax(dim=1)
            if own is None:
                yc = labels[start:stop]
                target = logits[rows, yc]
            else:
                target = own[start:stop]
                top = torch.maximum(top, target)
            total -= (target - top).sum()
            # softmax in place, one pass per step: these passes over (c, N) are most of the cost
            grad = logits.sub_(top[:, None]).exp_()
            norm = grad.sum(dim=1)
            if own is not None:
                own_p = (target - top).exp_()
                norm += own_p
            total += norm.log().sum()
            grad.div_(norm[:, None])
            if own is None:
                grad[rows, yc] -= 1.0  # d loss_sum / d logits = softmax - onehot
            elif down is not None:
                torch.div(own_p, norm, out=down[start:stop]).sub_(1.0)
            if dbias is not None:
                dbias.addmv_(grad.T, ones[: stop - start])  # a column sum through BLAS: sum(0) was slower
            if low:  # the products in mm_dtype at the padded shape (zero rows add nothing), sums in float32
                grad = F.pad(grad.to(mm_dtype), (0, 0, 0, chunk - len(rows)))
                if dz is not None:
                    dz[start:stop] = torch.mm(grad, table_mm)[: len(rows)]
                if dtable is not None:
                    dtable += torch.mm(grad.T, zc)
            else:
                if dz is not None:
                    torch.mm(grad, table, out=dz[start:stop])
                if dtable is not None:
                    dtable.addmm_(grad.T, zc)
        ctx.scale = 1.0 / M
        ctx.present = tuple(t is not None for t in (dz, dtable, dbias, down))
        ctx.save_for_backward(*(t if t is not None else z.new_empty(0) for t in (dz, dtable, dbias, down)))
        return total / M

    @staticmethod
    def backward(ctx, grad_out):
        g = grad_out * ctx.scale
        grads = [t * g if present else None for t, present in zip(ctx.saved_tensors, ctx.present)]
        return grads[0], grads[1], grads[2], grads[3], None, None, None, None


# Rows per chunk in low precision, where every chunk is padded to this many rows.
LOW_CHUNK_ROWS = 1024


def _lowers(z: torch.Tensor, mm_dtype: torch.dtype | None) -> bool:
    """Whether the products run in a type other than the inputs' own."""
    return mm_dtype is not None and mm_dtype != z.dtype


def _chunk_rows(z: torch.Tensor, table: torch.Tensor, chunk: int | None, mm_dtype=None) -> int:
    if z.shape[0] == 0:
        raise ValueError("the cross-entropy needs at least one row")
    if chunk:
        return chunk
    if _lowers(z, mm_dtype):
        return min(LOW_CHUNK_ROWS, max(64, CHUNK_ENTRIES // max(1, table.shape[0])))
    return max(64, CHUNK_ENTRIES // max(1, table.shape[0]))


def item_cross_entropy(z: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                       chunk: int | None = None, mm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over rows of -log softmax(z @ table.T + bias)[label]; equal to F.cross_entropy on the full
    logits. Inside a no-grad or inference context it only computes the loss."""
    chunk = _chunk_rows(z, table, chunk, mm_dtype)
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return torch.cat([torch.nn.functional.cross_entropy(
                torch.addmm(bias, z[s : s + chunk], table.T), labels[s : s + chunk], reduction="none")
                for s in range(0, z.shape[0], chunk)]).mean()
    return _ChunkedItemCE.apply(z, table, bias, None, labels, None, chunk, mm_dtype)


def sampled_cross_entropy(z: torch.Tensor, own: torch.Tensor, table: torch.Tensor, bias: torch.Tensor,
                          exclude: torch.Tensor, chunk: int | None = None,
                          mm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over rows of -log softmax([own, z @ table.T + bias])[0] with column `exclude[i]` of row i left
    out (-1: none): each row's own logit against shared candidates. Equal to F.cross_entropy on the
    concatenated logits with the excluded entries at -inf, without writing them to memory."""
    chunk = _chunk_rows(z, table, chunk, mm_dtype)
    return _ChunkedItemCE.apply(z, table, bias, own, None, exclude, chunk, mm_dtype)
