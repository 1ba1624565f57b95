"""The sequence encoder shared by every recipe: BERT4Rec (bidirectional, cloze) or SASRec (causal).

Reads top to bottom: attention -> feed-forward -> block -> model. Inputs are left-padded token
matrices (0 = padding) so the most recent item is always the last column, whatever the batch width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import BackboneConfig
from models.dropout import Dropout
from models.item_ce import item_cross_entropy


def attention(q, k, v, mask, causal=False):
    """Scaled dot-product attention, in float32 even under autocast: on CPU its bfloat16 backward was
    2.3x slower than float32's (11.1 ms against 4.8 ms per call, sasrec at batch 32, one thread).
    mask None: every key is real, and `causal` says whether query i sees keys up to i only."""
    if torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _observed(module: nn.Module) -> bool:
    """Whether a forward hook watches the module, its own or a global one (torch keeps both registries
    as module attributes: there is no public query)."""
    from torch.nn.modules import module as registry

    return bool(module._forward_hooks or module._forward_pre_hooks or registry._global_forward_hooks
                or registry._global_forward_pre_hooks)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.heads = cfg.heads
        self.causal = cfg.kind == "sasrec"
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, qkv, mask, last_only=False):
        """qkv (B, T, 3D) projected; mask (B, 1, T|1, T) bool, or None when no token is padding."""
        B, T, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(D, dim=2)
        if last_only:  # one query (the final position) against every key
            q, mask = q[:, -1:], (None if mask is None else mask[:, :, -1:])
        Tq = q.shape[1]
        q = q.reshape(B, Tq, self.heads, D // self.heads).transpose(1, 2)  # (B, H, Tq, d)
        k, v = (t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (k, v))  # (B, H, T, d)
        # No dropout on the attention probabilities: on CPU it forces the unfused attention path and a
        # (B, H, T, T) random mask, which made a training step 1.5-2x slower; dropout stays on the
        # embeddings and on each sub-layer's output.
        # Without padding a causal mask needs no tensor: the kernel skips the blocks above the diagonal
        # instead of reading a (B, T, T) mask (a 200-wide sasrec batch's attention 1.7x faster forward).
        y = attention(q, k, v, mask, causal=mask is None and self.causal and not last_only)
        return self.proj(y.transpose(1, 2).reshape(B, Tq, D))


class FeedForward(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.inner)
        self.fc2 = nn.Linear(cfg.inner, cfg.hidden)
        self.act = F.relu if cfg.activation == "relu" else F.gelu
        # The original SASRec block also drops inside the feed-forward, after the activation.
        self.inner_drop = Dropout(cfg.dropout) if cfg.norm == "sasrec" else nn.Identity()

    def forward(self, x):
        return self.fc2(self.inner_drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Three arrangements of the same tensors:
    - post: LayerNorm after each residual sum (BERT, BERT4Rec);
    - pre: LayerNorm before each sub-layer, the residual stream left unnormalised (trains faster and more
      stably at these sizes);
    - sasrec: the original SASRec code's block: queries from the normalised input, keys and values from the
      input itself, the attention output added to the normalised input, then a normalised stream into
      the feed-forward, which drops inside as well.

    Split in two so the packed inference path (models/packed.py) can run attention its own way:
    `project` gives the qkv projection and the stream the attention output is added to, `finish` adds it
    back and applies the feed-forward. Every Linear and LayerNorm is called once per pass when a hook
    watches it, which the per-example Fisher (merging/per_example.py) and RegMean rely on."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.norm = cfg.norm
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.ffn = FeedForward(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.drop = Dropout(cfg.dropout)

    def project(self, x):  # (..., T, D) -> (qkv (..., T, 3D), the residual stream the attention adds to)
        if self.norm == "sasrec":
            # Queries from the normalised rows, keys and values from the raw ones.
            r = self.ln1(x)
            D = x.shape[-1]
            qkv = self.attn.qkv
            if not _observed(qkv):
                # Each slice of the weight on the rows it serves: a third of the product and no stacked
                # copy (the ml-1m sasrec epoch 13% shorter, bench/train_speed.py).
                return torch.cat([F.linear(r, qkv.weight[:D], qkv.bias[:D]),
                                  F.linear(x, qkv.weight[D:], qkv.bias[D:])], dim=-1), r
            # Watched (the per-example Fisher's and RegMean's hooks read each Linear's input and output
            # once per pass): normalised rows then raw rows through one call, read back from each half.
            T = x.shape[-2]
            both = qkv(torch.cat([r, x], dim=-2))
            return torch.cat([both[..., :T, :D], both[..., T:, D:]], dim=-1), r
        return self.attn.qkv(self.ln1(x) if self.norm == "pre" else x), x

    def finish(self, r, a):  # r: the residual stream at the query rows, a: the attention output there
        if self.norm == "pre":
            h = r + self.drop(a)
            return h + self.drop(self.ffn(self.ln2(h)))
        if self.norm == "sasrec":
            h = self.ln2(r + self.drop(a))
            return h + self.drop(self.ffn(h))
        h = self.ln1(r + self.drop(a))
        return self.ln2(h + self.drop(self.ffn(h)))

    def forward(self, x, mask, last_only=False):
        # Always through the qkv module, even when only the final query is needed: the per-example
        # Fisher hooks modules, and slicing the weight by hand would bypass them.
        qkv, r = self.project(x)
        a = self.attn(qkv, mask, last_only)
        return self.finish(r[:, -1:] if last_only else r, a)


class SeqRecModel(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden
        self.item_emb = nn.Embedding(cfg.vocab, D, padding_idx=0)  # tied with the output layer
        self.pos_emb = nn.Embedding(cfg.max_len, D)
        self.emb_ln = nn.LayerNorm(D)
        self.emb_drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        # Pre-LN and the sasrec block end on an unnormalised sum: one LayerNorm after the last block (none in post).
        self.final_ln = nn.LayerNorm(D) if cfg.norm in ("pre", "sasrec") else nn.Identity()
        if cfg.head:
            self.head = nn.Linear(D, D)
            self.head_ln = nn.LayerNorm(D)
        self.out_bias = nn.Parameter(torch.zeros(cfg.n_items))  # column c scores item c+1
        # Mixed precision (models/precision.py): the type the encoder's products and the output layer's
        # products run in while training; None = float32. A runtime setting, not part of the checkpoint.
        self.compute_dtype: torch.dtype | None = None
        self.reset_parameters()

    def reset_parameters(self):
        # Tables at std ~ D^-0.5: N(0, 1) tables were seen to stall training (SPEC §9).
        std = self.cfg.hidden ** -0.5
        nn.init.normal_(self.item_emb.weight, std=std)
        nn.init.normal_(self.pos_emb.weight, std=std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def causal(self) -> bool:
        return self.cfg.kind == "sasrec"

    def attention_mask(self, tokens):  # (B, T) -> (B, 1, T|1, T)
        valid = tokens != 0
        if not self.causal:
            return valid[:, None, None, :]
        T = tokens.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        mask = allowed[None] & valid[:, None, :]
        # A padding query sees no real key under causality; let it see itself so softmax stays finite.
        mask |= torch.eye(T, dtype=torch.bool, device=tokens.device)[None]
        return mask[:, None]

    def positions(self, tokens):  # (B, T) left-padded -> (B, T) rows of pos_emb, or (1, T) for "end"
        """Either way a narrow batch embeds exactly like a full-width one: "end" counts back from the last
        column, "start" from each row's first real token (padding takes row 0; nothing attends to it)."""
        T = tokens.shape[1]
        col = torch.arange(T, device=tokens.device)
        if self.cfg.positions == "end":
            return (col + (self.cfg.max_len - T))[None]
        real = tokens != 0
        # Leading padding per row; a row of padding only (an empty history) counts as one token at row 0.
        first = torch.where(real.any(1, keepdim=True), real.to(torch.uint8).argmax(1, keepdim=True), T - 1)
        return (col[None] - first).clamp_(min=0)

    def encode(self, tokens, last_only=False):  # (B, T) left-padded -> (B, T, D), or (B, 1, D) if last_only
        """last_only: only the final position's state, all a sequence representation (contrastive view)
        needs; the last block then computes one query instead of T, about halving a 2-layer pass."""
        B, T = tokens.shape
        if T > self.cfg.max_len:
            raise ValueError(f"sequence width {T} exceeds max_len {self.cfg.max_len}")
        # Mixed precision: widths rounded up to a multiple of 8 with extra left padding, which changes no
        # real position's state, so a few shapes recur: oneDNN sets up each new product shape at a cost
        # (~4 ms) larger than what bfloat16 saves on it.
        W = min(self.cfg.max_len, -(-T // 8) * 8)
        if self.compute_dtype is not None and W > T:
            out = self.encode(F.pad(tokens, (W - T, 0)), last_only)
            return out if last_only else out[:, W - T :]
        x = self.emb_drop(self.emb_ln(self.item_emb(tokens) + self.pos_emb(self.positions(tokens))))
        # Over half of a length-sorted epoch's batches hold no padding at all (ml-1m: 57% of the cells).
        mask = None if bool((tokens != 0).all()) else self.attention_mask(tokens)
        # Under autocast only the Linear layers run in compute_dtype (attention stays float32: `attention`);
        # the residual stream (float32 + low precision -> float32), every LayerNorm and the result stay
        # float32.
        with torch.autocast(tokens.device.type, dtype=self.compute_dtype or torch.bfloat16,
                            enabled=self.compute_dtype is not None):
            for i, block in enumerate(self.blocks):
                x = block(x, mask, last_only and i == len(self.blocks) - 1)
        return self.final_ln(x)

    def project(self, h):  # (..., D) -> (..., D): the output head (if any) before the tied item table
        return self.head_ln(F.gelu(self.head(h))) if self.cfg.head else h

    def item_logits(self, z):  # (..., D) -> (..., n_items)
        return z @ self.item_emb.weight[1 : self.cfg.n_items + 1].T + self.out_bias

    def logits(self, h):
        return self.item_logits(self.project(h))

    def item_loss(self, z, labels):  # (M, D) projected states, (M,) columns -> mean full-softmax CE
        return item_cross_entropy(z, self.item_emb.weight[1 : self.cfg.n_items + 1], self.out_bias, labels,
                                  mm_dtype=self.compute_dtype)

    def inference_tokens(self, history):
        """(B, T) left-padded histories -> the tokens whose last position predicts the next item."""
        if self.causal:
            return history[:, -self.cfg.max_len :]
        keep = history[:, -(self.cfg.max_len - 1) :]
        mask = torch.full((keep.shape[0], 1), self.cfg.mask_token, dtype=keep.dtype, device=keep.device)
        return torch.cat([keep, mask], dim=1)

    def next_item_scores(self, history):  # (B, T) left-padded -> (B, n_items), column c = item c+1
        h = self.encode(self.inference_tokens(history), last_only=True)  # only the final position is scored
        return self.logits(h[:, -1])

    def packed_scores(self, histories) -> torch.Tensor:
        """next_item_scores for a list of 1-D histories of any lengths, without padding work
        (models/packed.py); equal to next_item_scores on the padded batch up to float rounding."""
        from models.packed import final_states  # packed reaches into this module's blocks

        seqs = [self.inference_tokens(torch.as_tensor(h, device=self.item_emb.weight.device).reshape(1, -1))[0]
                for h in histories]
        # An empty causal history has no tokens: one padding token gives what a padded row of zeros gives.
        seqs = [s if len(s) else s.new_zeros(1) for s in seqs]
        return self.logits(final_states(self, seqs))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

