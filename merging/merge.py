"""The merge engine: validate everything it can from headers, then stream tensor by tensor (row block by
row block for elementwise methods) from the inputs through the method into a temporary file that is
renamed into place only when complete. Memory stays near (M checkpoints + M Fishers) x one block.

    merge_checkpoints("fisher", ["a.safetensors", "b.safetensors"], "m.safetensors",
                      fishers=["a.fisher.safetensors", "b.fisher.safetensors"], options={"normalize": True})
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.compat import Ingredient, check_fisher, check_fisher_checkpoint, check_same_model, check_values
from merging.fisher_norm import FIELD as SQ_NORM
from merging.fisher_norm import SquaredNorm, sq_norm_of_tensors, stored_sq_norm
from merging.heap import keep_freed_blocks
from merging.io import SafetensorsReader, SafetensorsWriter, row_blocks
from merging.methods import MergeMethod, MergeOptionsError, get_method
from merging.methods.base import FitInputs, TensorInputs
from merging.methods.greedy_soup import greedy_select
from merging.prefetch import prefetched
from models.checkpoint import CheckpointMeta, file_sha256
from models.errors import CheckpointError

Progress = Callable[[str, float], None] | None
# Per input block. Measured on 6 x 205 MB inputs: 4 MB was fastest; 32 MB blocks sit above glibc's largest
# mmap threshold, so every block was a fresh mapping (3.5 GB of page faults, 3x the wall time).
DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass
class MergeResult:
    path: Path
    sha256: str
    method: str
    metadata: dict[str, str]
    bytes_read: int  # inputs, every pass: separate sha256, norms of Fishers without sq_norm, greedy-soup, merge
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    output_reread: int = 0  # bytes of the output read back to hash it after its header was rewritten
    # What a method that fits on data chose (weight-search: coefficients, score, candidates; regmean;
    # adamerging: coefficients, losses), also recorded in the file's `merge` metadata.
    fitted: dict[str, Any] = field(default_factory=dict)


def build_method(name: str, n_models: int, options: dict[str, Any] | None = None,
                 weights: Sequence[float] | None = None) -> MergeMethod:
    cls = get_method(name)
    model_options = None
    if weights is not None:
        if "weight" not in cls.ModelOptions.model_fields:
            raise MergeOptionsError(f"{name}: takes no per-model weights")
        if len(weights) != n_models:
            raise MergeOptionsError(f"{name}: got {len(weights)} weights for {n_models} checkpoints")
        model_options = [{"weight": w} for w in weights]
    return cls(n_models, options, model_options)


def _check_roles(m: MergeMethod, n: int, base, fishers, score, grams=None, objective=None) -> None:
    uses_base = m.base_use(m.options.model_dump())
    if uses_base and base is None:
        raise MergeOptionsError(f"{m.name}: works on task vectors and needs a base checkpoint")
    if not uses_base and base is not None:
        raise MergeOptionsError(f"{m.name}: does not use a base checkpoint")
    uses_fisher = m.fisher_use(m.options.model_dump())
    if uses_fisher and fishers is None:
        raise MergeOptionsError(f"{m.name}: needs one Fisher file per checkpoint")
    if not uses_fisher and fishers is not None:
        raise MergeOptionsError(f"{m.name}: does not use Fisher files")
    if fishers is not None and len(fishers) != n:
        raise MergeOptionsError(f"{m.name}: got {len(fishers)} Fisher files for {n} checkpoints")
    if m.needs_score and score is None:
        raise MergeOptionsError(f"{m.name}: needs a score function (validation NDCG@10)")
    if m.needs_grams and grams is None:
        raise MergeOptionsError(f"{m.name}: needs a function giving each model's linear-input Gram matrices")
    if m.needs_objective and objective is None:
        raise MergeOptionsError(f"{m.name}: needs a differentiable objective of the merged parameters")


@contextmanager
def torch_threads(n: int | None):
    """Run a streaming pass with `n` intra-op threads. Its kernels are memory-bound and short, and on a
    loaded machine OpenMP workers spin-waiting between them were measured to triple the wall time."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # half-precision inputs are merged in float32


def _checked(block: torch.Tensor, name: str, reader: SafetensorsReader, fisher: bool = False) -> torch.Tensor:
    """A block as read, refused if it holds NaN/Inf (or, in a Fisher, a negative entry), in the compute dtype."""
    check_values(block, name, reader.path, fisher=fisher)
    return block.to(compute_dtype(block.dtype))


def _stream(m: MergeMethod, ings: list[Ingredient], base: Ingredient | None, fishers: list[SafetensorsReader] | None,
            sink: Callable[[str, torch.Tensor], None], chunk_bytes: int, progress: Callable[[float], None]) -> None:
    """The one loop every merge runs: read a block of each input, merge it, hand the result to `sink`.

    For elementwise methods a second thread reads (and hashes, see SafetensorsReader.hash_as_read) the next
    block of each checkpoint while this one checks, merges and writes the current block; the Fishers are
    read here. Hashing costs about what reading and checking the Fishers do, so this split kept both
    threads busy (docs/results/merge_memory.md, run 5). A whole-tensor method reads in turn, so memory
    holds one set of tensors."""
    ref = ings[0].reader
    readers = [i.reader for i in ings] + ([base.reader] if base else []) + (fishers or [])
    total = sum(info.nbytes for r in readers for info in r.tensors.values()) or 1
    steps = [(name, info, start, stop) for name, info in ref.tensors.items()
             for start, stop in (row_blocks(info, chunk_bytes) if m.elementwise else [(0, info.rows)])]

    def read_models(step) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        name, _, start, stop = step
        return ([i.reader.read(name, start, stop) for i in ings],
                base.reader.read(name, start, stop) if base is not None else None)

    done = 0
    with (prefetched(read_models, steps) if m.elementwise else nullcontext(map(read_models, steps))) as blocks:
        for (name, info, start, stop), (tensors, base_block) in zip(steps, blocks):
            x = TensorInputs(name, [_checked(t, name, i.reader) for t, i in zip(tensors, ings)], start=start)
            if base is not None:
                x.base = _checked(base_block, name, base.reader)
            if fishers is not None:
                x.fishers = [_checked(f.read(name, start, stop), name, f, fisher=True) for f in fishers]
            out = m.merge(x)
            check_values(out, name, f"the {m.name} merge (check its weights and options)")
            sink(name, out.to(info.dtype))
            done += sum(r.tensors[name].nbytes for r in readers) * (stop - start) // max(info.rows, 1)
            progress(min(done / total, 1.0))


def _to_state_dict(m: MergeMethod, ings: list[Ingredient], chunk_bytes: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    _stream(m, ings, None, None, lambda name, t: parts.setdefault(name, []).append(t), chunk_bytes, lambda f: None)
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}


def file_sq_norm(reader: SafetensorsReader, chunk_bytes: int, progress: Callable[[float], None]) -> float:
    """‖F‖² of a Fisher file without a `sq_norm` field (written before it existed), by the same definition as
    the field: a pass over the file, in its layout order (the definition does not depend on the order)."""
    acc, done, size = SquaredNorm(), 0, sum(t.nbytes for t in reader.tensors.values()) or 1
    for name, info in reader.tensors.items():
        for start, stop in row_blocks(info, chunk_bytes):
            block = reader.read(name, start, stop)
            check_values(block, name, reader.path, fisher=True)
            acc.add(block)
            done += block.nbytes
            progress(done / size)
        acc.end_tensor()
    return acc.value


def _fisher_norms(readers: list[SafetensorsReader], chunk_bytes: int, report) -> list[float]:
    """‖F‖ of each Fisher: from its `sq_norm` field (validated when it was opened), else from a pass over it."""
    sq = [stored_sq_norm(f.metadata, f.path) for f in readers]
    missing = [k for k, v in enumerate(sq) if v is None]
    for j, k in enumerate(missing):
        sq[k] = file_sq_norm(readers[k], chunk_bytes, lambda x, j=j: report("fisher-norms", (j + x) / len(missing)))
    return [math.sqrt(v) for v in sq]


def _merged_metadata(m: MergeMethod, ings: list[Ingredient], shas: list[str], base_sha: str | None,
                     fishers: list[SafetensorsReader] | None, selection: dict | None,
                     config: dict | None = None) -> dict[str, str]:
    metas = [i.meta for i in ings]
    ref = metas[0]
    same_recipe = all(mt.recipe == ref.recipe for mt in metas)
    recipe = ref.recipe if same_recipe else {"name": "merge", "ingredients": [mt.recipe for mt in metas]}
    extra = {k: v for k, v in ref.extra.items() if all(mt.extra.get(k) == v for mt in metas)}
    merge = {"method": m.name, "ingredients": shas, "base": base_sha, **m.describe()}
    if fishers is not None:
        # Without sq_norm (recorded as fisher_norms when used), so a Fisher with or without it gives the same file.
        merge["fishers"] = [{k: v for k, v in f.metadata.items() if k != SQ_NORM} for f in fishers]
    if selection is not None:
        merge["selection"] = selection
    if config is not None:
        merge["config"] = config
    meta = CheckpointMeta(backbone=ref.backbone, recipe=recipe, dataset_fingerprint=ref.dataset_fingerprint,
                          n_items=ref.n_items, merge=merge, extra=extra)
    return meta.to_header()


def merge_checkpoints(method: str, checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                      weights: Sequence[float] | None = None, options: dict[str, Any] | None = None,
                      base: str | os.PathLike | None = None, fishers: Sequence[str | os.PathLike] | None = None,
                      score: Callable[[dict[str, torch.Tensor]], float] | None = None,
                      grams: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                      objective: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
                      progress: Progress = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                      threads: int | None = 1, sha256s: Sequence[str] | None = None,
                      config: dict | None = None) -> MergeResult:
    """Merge `checkpoints` with `method` into the safetensors file `out`; nothing is left at (or beside)
    `out` unless the whole merge succeeds. The methods that choose on data get it from the caller:
    `score(state_dict) -> float` (greedy-soup, weight-search; higher is better), `grams(state_dict) ->
    {linear weight name: XᵀX}` (regmean), `objective(params) -> 0-d tensor` (adamerging; lower is better);
    see merging/methods/base.py FitInputs, and core/merge_inputs.py for the ones built from a dataset.
    `threads`: torch intra-op threads for the streaming passes (None leaves torch's setting alone; the
    setting is process-wide while the passes run).
    `sha256s`: the digests of the checkpoints (then the base), when the caller already knows them, as a
    content-addressed store does. The header is then final before the first tensor, so the output is hashed
    as it is written instead of read back, and a Fisher of another checkpoint is refused before anything
    is written. Each digest is still checked against the bytes the merge reads: a file that no longer
    matches is refused and leaves nothing behind. (A fisher merge gets the same from the digests its
    Fishers record; without either, the output is read back once to hash it.)
    `config`: the merge config that asked for this merge (merging/config.py, its record()), stored in the
    header's `merge` entry so the file says how to make it again."""
    t0 = time.perf_counter()
    keep_freed_blocks()
    report = progress or (lambda stage, f: None)
    n = len(checkpoints)
    m = build_method(method, n, options, weights)
    _check_roles(m, n, base, fishers, score, grams, objective)
    out = Path(out)
    inputs = [Path(p) for p in [*checkpoints, *([base] if base else []), *(fishers or [])]]
    for p in inputs:
        if p.resolve() == out.resolve():
            raise MergeOptionsError(f"{out}: the output would overwrite the input {p}")

    with ExitStack() as stack:
        ings = [stack.enter_context(Ingredient.open(p)) for p in checkpoints]
        base_ing = stack.enter_context(Ingredient.open(base)) if base else None
        for other in ings[1:] + ([base_ing] if base_ing else []):
            check_same_model(ings[0], other)
        fisher_readers = [stack.enter_context(SafetensorsReader(p)) for p in fishers] if fishers else None

        hashed = ings + ([base_ing] if base_ing else [])
        # The digests go into the header, which is written first. Normally the merge pass hashes each input
        # as it reads it front to back, and the header is rewritten at the end (see _finish_hashes). Greedy
        # soup cannot: it reads its candidates several times, and its last pass reads only the kept ones; nor
        # can the methods that fit on whole models before the merge pass.
        if sha256s is not None and (len(sha256s) != len(hashed) or not all(_is_digest(d) for d in sha256s)):
            raise MergeOptionsError(f"sha256s: expected {len(hashed)} sha256 hex digests (the checkpoints, then the "
                                    f"base), got {list(sha256s)!r}")
        given: list[str | None] = list(sha256s) if sha256s is not None else [None] * len(hashed)
        shas = list(given)
        separately = 0  # bytes read by a separate hashing pass
        reads_first = m.needs_score or m.fits
        if reads_first:
            for k, ing in enumerate(hashed):
                shas[k] = file_sha256(ing.path)
                separately += ing.path.stat().st_size
                report("hash", (k + 1) / len(hashed))
            _check_given(hashed, given, shas)
        if fisher_readers:
            for f, ing, sha in zip(fisher_readers, ings, shas):
                # With sha None the sha256 is compared after the merge pass, before the commit: knowing it now
                # would cost a separate read of every checkpoint, and a mismatch still leaves nothing behind.
                check_fisher(f, ing, sha)
        if m.needs_fisher_norms:
            with torch_threads(threads):
                m.set_fisher_norms(_fisher_norms(fisher_readers, chunk_bytes, report))

        selection, used = None, ings
        if m.fits:
            with torch_threads(threads):
                _fit(m, ings, base_ing, FitInputs(score, grams, objective), report, fisher_readers)
        elif m.needs_score:
            selection = _greedy(m, ings, score, chunk_bytes, report)
            used = [ings[i] for i in selection["kept"]]

        def metadata_for(digests: list[str | None]) -> dict[str, str]:
            # A digest not known yet stands in as 64 zeros: same length, so the header keeps its size.
            final = [d or _NO_DIGEST for d in digests]
            return _merged_metadata(m, ings, final[:n], final[n] if base_ing else None, fisher_readers, selection,
                                    config)

        # Everything the header needs but the digests is known now; it goes first, so the tensors can stream after
        # it. A Fisher names the checkpoint it was computed for: that digest stands in for one not known yet, so
        # the header is final at once and the output is hashed as it is written, never read back. The pass still
        # hashes every checkpoint, and a Fisher of another checkpoint is refused before the commit.
        header_shas = list(shas)
        for k, f in enumerate(fisher_readers or []):
            if header_shas[k] is None and _is_digest(f.metadata["checkpoint_sha256"]):
                header_shas[k] = f.metadata["checkpoint_sha256"]
        provisional = None in header_shas
        metadata = metadata_for(header_shas)
        entries = [(name, info.dtype, info.shape) for name, info in ings[0].reader.tensors.items()]
        for r in [i.reader for i in used] + ([base_ing.reader] if base_ing else []) + (fisher_readers or []):
            r.drop_cache = True  # the last pass over the inputs
        verify = not reads_first  # the merge pass hashes every input: digests unknown, or given to check
        with SafetensorsWriter(out, entries, metadata, provisional=provisional) as writer, torch_threads(threads):
            if verify:
                for ing in hashed:  # one laid out unlike the first checkpoint is hashed on its own afterwards
                    ing.reader.hash_as_read(list(ings[0].reader.tensors))
            _stream(m, used, base_ing, fisher_readers, writer.write, chunk_bytes, lambda f: report("merge", f))
            if verify:
                shas, extra = _finish_hashes(hashed, report)
                separately += extra
                _check_given(hashed, given, shas)  # a refusal here still leaves nothing behind
                for f, ing, sha in zip(fisher_readers or [], ings, shas):
                    check_fisher_checkpoint(f, ing, sha)
            if provisional:
                metadata = metadata_for(shas)
                writer.rewrite_header(metadata)
            elif metadata != metadata_for(shas):  # cannot happen once the checks above passed; never commit it
                raise RuntimeError("merge: the header's digests differ from the inputs' after all checks")
            sha = writer.commit()
        read = separately + sum(r.bytes_read for r in [i.reader for i in ings] + ([base_ing.reader] if base_ing else [])
                                + (fisher_readers or []))
    stats = {"fallback_entries": m.fallback_entries, "fallback": m.fallback} if hasattr(m, "fallback_entries") else {}
    return MergeResult(out, sha, m.name, metadata, read, time.perf_counter() - t0, stats, writer.bytes_reread,
                       m.fitted())


_NO_DIGEST = "0" * 64


def _is_digest(d) -> bool:
    return isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)


def _check_given(hashed: list[Ingredient], given: list[str | None], shas: list[str]) -> None:
    for ing, want, got in zip(hashed, given, shas):
        if want is not None and want != got:
            raise CheckpointError(f"{ing.path}: its sha256 is {got[:12]}…, but {want[:12]}… was given for it "
                                  f"(the file changed after its digest was taken)")


def _finish_hashes(hashed: list[Ingredient], report) -> tuple[list[str], int]:
    """Each input's sha256 from the merge pass; an input whose tensors were not read in file order (its
    layout differs from the first checkpoint's) is hashed again on its own. Also returns the bytes that took."""
    shas = [ing.reader.finish_hash() for ing in hashed]
    again = [k for k, sha in enumerate(shas) if sha is None]
    for j, k in enumerate(again):
        shas[k] = file_sha256(hashed[k].path)
        report("hash", (j + 1) / len(again))
    return shas, sum(hashed[k].path.stat().st_size for k in again)


def _greedy(m: MergeMethod, ings: list[Ingredient], score, chunk_bytes: int, report) -> dict:
    n, evaluated = len(ings), 0

    def soup_score(indices: list[int]) -> float:
        nonlocal evaluated
        s = float(score(_to_state_dict(m, [ings[i] for i in indices], chunk_bytes)))
        if not math.isfinite(s):
            raise MergeOptionsError(f"{m.name}: the score function returned {s} for models {indices}")
        evaluated += 1
        report("greedy-soup", evaluated / (2 * n - 1))  # n alone + at most n-1 candidate soups
        return s

    individual = [soup_score([i]) for i in range(n)]
    kept, history = greedy_select(individual, soup_score)
    report("greedy-soup", 1.0)
    return {"individual": individual, "kept": kept, "history": history}


def _read_state(reader: SafetensorsReader, fisher: bool = False) -> dict[str, torch.Tensor]:
    return {name: _checked(reader.read(name), name, reader, fisher=fisher) for name in reader.tensors}


def _fit(m: MergeMethod, ings: list[Ingredient], base: Ingredient | None, inputs: FitInputs, report,
         fishers: list[SafetensorsReader] | None = None) -> None:
    """The whole models in memory (compute dtype), for a method that learns its coefficients from them. A
    state dict handed to a caller's function holds each tensor in its stored dtype, as the file will."""
    states = [_read_state(i.reader) for i in ings]
    base_state = _read_state(base.reader) if base is not None else None
    dtypes = {name: info.dtype for name, info in ings[0].reader.tensors.items()}

    def stored(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtypes[k]) for k, v in state.items()}

    if inputs.score is not None:
        score = inputs.score
        inputs.score = lambda state: score(stored(state))
    if inputs.grams is not None:
        grams = inputs.grams
        inputs.grams = lambda state: grams(stored(state))
    fisher_states = [_read_state(f, fisher=True) for f in fishers] if fishers else None
    m.fit(states, base_state, inputs, lambda f: report(m.name, f), fishers=fisher_states)
    report(m.name, 1.0)


def merge_state_dicts(m: MergeMethod, state_dicts: list[dict[str, torch.Tensor]],
                      base: dict[str, torch.Tensor] | None = None,
                      fishers: list[dict[str, torch.Tensor]] | None = None,
                      fisher_norms: list[float] | None = None, inputs: FitInputs | None = None,
                      ) -> dict[str, torch.Tensor]:
    """The same merge, whole tensors in memory: for models that fit in RAM, and the reference the
    streamed result is checked against. `fisher_norms` default to the Fishers' own (merging/fisher_norm.py:
    the same bits as the streamed merge's). `inputs`: the data functions of a method that fits."""
    if m.fits:
        cd = {k: compute_dtype(v.dtype) for k, v in state_dicts[0].items()}
        base_state = None if base is None else {k: v.to(cd[k]) for k, v in base.items()}
        fisher_states = None if fishers is None else [{k: v.to(cd[k]) for k, v in f.items()} for f in fishers]
        m.fit([{k: v.to(cd[k]) for k, v in sd.items()} for sd in state_dicts], base_state, inputs or FitInputs(),
              lambda f: None, fishers=fisher_states)
    if m.needs_fisher_norms:
        m.set_fisher_norms(fisher_norms or [math.sqrt(sq_norm_of_tensors(f)) for f in fishers])
    out = {}
    for name, ref in state_dicts[0].items():
        cd = compute_dtype(ref.dtype)
        x = TensorInputs(name, [sd[name].to(cd) for sd in state_dicts],
                         base=base[name].to(cd) if base is not None else None,
                         fishers=[f[name].to(cd) for f in fishers] if fishers is not None else None)
        out[name] = m.merge(x).to(ref.dtype)
    return out

