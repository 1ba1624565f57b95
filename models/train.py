"""The trainer: one loop for every recipe and both backbones. Adam(W), seeded, a learning-rate schedule
over the run (by epochs, or by the wall-clock budget when one is set), early stopping on validation
NDCG@10 (full ranking), length-aware batches, a resumable state after every epoch, a progress bar, CUDA
when present."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.backbone import SeqRecModel
from models.batching import length_batches
from models.checkpoint import CREATED_BY, CheckpointMeta, check_trained_on, load_checkpoint, save_checkpoint
from models.config import DESIGN, SHAPE_FIELDS, BackboneConfig
from models.errors import IncompatibleError, RecmergeError
from models.precision import PRECISIONS, mixed_precision, resolve_precision
from models.recipes import TrainBatch, recipe_class, recipe_options

Progress = Callable[[str, float], None]


SCHEDULES = ("constant", "cosine")
EPOCHS = 200
# With a wall-clock budget and no epoch count: a bound no run meets before its budget (at least ~1 s
# per epoch on ml-1m even on a GPU), kept finite so the schedule's step count stays defined.
EPOCHS_UNDER_BUDGET = 100_000


@dataclass
class TrainConfig:
    recipe: str = "bert4rec"
    options: dict = field(default_factory=dict)  # the recipe's hyper-parameters
    backbone: str = "bert4rec"
    # The backbone's shape. Defaults: the design measured fastest to learn on ml-1m here
    # (docs/results/accuracy-ml-1m.md): no output head, and per backbone the fields of DESIGN, which a
    # field left at None (or "auto") takes once the backbone is known.
    hidden: int = 64
    layers: int = 2
    heads: int | None = None
    inner: int | None = None
    dropout: float | None = None
    max_len: int = 200
    norm: str | None = None
    head: bool = False
    activation: str | None = None
    positions: str | None = None
    # The optimisation.
    # None: 200, or with --max-minutes as many as the budget allows (the budget alone ends the run: a
    # 60-minute bert4rec on two cores reached 200 epochs after 49 minutes).
    epochs: int | None = None
    batch_size: int = 32  # more steps per epoch: the popularity plateau lasts a number of steps
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 5.0
    schedule: str = "cosine"  # constant | cosine (to final_lr_ratio·lr at the end of the run)
    warmup_steps: int = 100
    final_lr_ratio: float = 0.02
    patience: int = 0  # evaluations without validation gain before stopping; 0 = never stop early
    eval_every: int = 1  # validate every k epochs (and after the last)
    seed: int = 0
    init: str | None = None  # a checkpoint to start from (the fine-tune setting)
    device: str | None = None
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    # auto: bfloat16 products where the hardware makes them fast (models/precision.py), else float32
    precision: str = "auto"
    # Wall-clock budget: the run ends with the epoch that crosses it, and the schedule runs over it.
    max_minutes: float | None = None
    resume: bool = False  # continue from the state file beside `out` if there is one

    def __post_init__(self):
        # Resolved first, so that a run's identity (and so --resume) records the design it really trains.
        if self.backbone not in DESIGN:
            raise RecmergeError(f"unknown backbone {self.backbone!r}; known: {', '.join(DESIGN)}")
        for name, value in DESIGN[self.backbone].items():
            if getattr(self, name) in (None, "auto"):
                setattr(self, name, value)
        if self.epochs is None:
            self.epochs = EPOCHS if self.max_minutes is None else EPOCHS_UNDER_BUDGET
        for name in ("epochs", "batch_size", "hidden", "layers", "heads", "max_len", "eval_every", "inner"):
            if getattr(self, name) < 1:
                raise RecmergeError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise RecmergeError(f"lr must be > 0 (got {self.lr})")
        if self.schedule not in SCHEDULES:
            raise RecmergeError(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.warmup_steps < 0 or not 0 <= self.final_lr_ratio <= 1:
            raise RecmergeError("warmup_steps must be >= 0 and final_lr_ratio in [0, 1]")
        if self.precision not in PRECISIONS:
            raise RecmergeError(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise RecmergeError(f"max_minutes must be > 0 (got {self.max_minutes})")
        self.betas = tuple(self.betas)

    @classmethod
    def continuing(cls, backbone: BackboneConfig, init: str, **kw) -> TrainConfig:
        """A run that starts from a checkpoint of this backbone (fine-tuning, a merge's extra epochs):
        every shape field is the checkpoint's."""
        shape = {k: getattr(backbone, k) for k in SHAPE_FIELDS}
        return cls(backbone=backbone.kind, init=init, **shape, **kw)


@dataclass
class TrainResult:
    checkpoint: Path
    sha256: str
    best_epoch: int
    valid: dict  # full-ranking validation metrics of the saved (best) epoch
    history: list[dict]
    seconds: float
    log_path: Path


def build_samples(train_seqs: list[np.ndarray], max_len: int, causal: bool) -> list[np.ndarray]:
    """Cut each training sequence into windows from its most recent end, so long histories are used
    whole instead of truncated. Causal windows overlap by one item: every transition is a target once."""
    window = max_len + 1 if causal else max_len
    step = window - 1 if causal else window
    min_len = 2 if causal else 1
    samples = []
    for seq in train_seqs:
        end = len(seq)
        while end >= min_len:
            start = max(0, end - window)
            samples.append(np.asarray(seq[start:end], dtype=np.int64))
            if start == 0:
                break
            end = start + (window - step)
    return samples


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backbone_config(cfg: TrainConfig, n_items: int) -> BackboneConfig:
    try:
        return BackboneConfig(n_items=n_items, kind=cfg.backbone, **{k: getattr(cfg, k) for k in SHAPE_FIELDS})
    except ValueError as e:
        raise RecmergeError(str(e)) from None


def load_init(path: str, bcfg: BackboneConfig, ds) -> dict[str, torch.Tensor]:
    state, meta = load_checkpoint(path)
    check_trained_on(meta, ds, f"--init {path}")
    mine, theirs = asdict(bcfg), asdict(meta.backbone)
    # Dropout is a training choice, not part of the parameters; everything else must agree.
    diff = [k for k in mine if k != "dropout" and mine[k] != theirs[k]]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {theirs[k]} vs requested {mine[k]}" for k in diff)
        raise IncompatibleError(f"--init {path}: another backbone ({detail})")
    return state


def _decay_groups(model: SeqRecModel, extra: list[torch.nn.Parameter], weight_decay: float):
    # Decay only the Linear weights: decaying embeddings, LayerNorm and biases hurts recommenders.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay + list(extra), "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """Multiplier of cfg.lr at optimiser step `step`, `progress` in [0, 1] through the run."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "constant":
        return warm
    p = min(1.0, max(0.0, progress))
    return warm * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def train(ds, cfg: TrainConfig, out: str | Path, progress: Progress | None = None,
          show_bar: bool = False) -> TrainResult:
    from models.evaluate import evaluate  # evaluation imports the backbone; keep the import edge one-way
    from models.train_state import load_state, save_state, state_path

    out = Path(out)
    if out.suffix != ".safetensors":
        raise RecmergeError(f"{out}: the output checkpoint must end in .safetensors")
    options = recipe_options(cfg.recipe, cfg.options)
    bcfg = backbone_config(cfg, ds.n_items)
    device = resolve_device(cfg.device)
    init_state = load_init(cfg.init, bcfg, ds) if cfg.init else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = SeqRecModel(bcfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    recipe = recipe_class(cfg.recipe)(options, model)
    low = resolve_precision(cfg.precision, device)

    samples = build_samples(ds.train_sequences(), bcfg.max_len, model.causal)
    if not samples:
        raise RecmergeError("no training samples: every training sequence is too short")
    recipe.setup(samples)
    lengths = np.array([len(s) for s in samples])
    extra = recipe.parameters()
    opt = torch.optim.AdamW(_decay_groups(model, extra, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    batches_per_epoch = math.ceil(len(samples) / cfg.batch_size)
    total_steps = cfg.epochs * batches_per_epoch

    history: list[dict] = []
    best = (-math.inf, 0, None, {})  # (ndcg, epoch, state, metrics)
    bad_evals, step, spent, first_epoch = 0, 0, 0.0, 1
    spath = state_path(out)
    # The run's identity: a state saved by another configuration or dataset is not resumed.
    identity = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "device", "threads")},
                "dataset": ds.fingerprint, "precision": str(low or torch.float32)}
    if cfg.resume and spath.exists():
        info, best_state = load_state(spath, model=model, extra_params=extra, opt=opt, rng=rng)
        if info["identity"] != json.loads(json.dumps(identity)):
            raise RecmergeError(f"--resume: {spath} belongs to another run (configuration or dataset differ)")
        recipe.restore_state(info["recipe_state"])
        history, step, spent, bad_evals = info["history"], info["step"], info["seconds"], info["bad_evals"]
        best = (info["best_ndcg"], info["best_epoch"], best_state, info["best_valid"])
        first_epoch = info["epoch"] + 1
        if info["finished"]:
            first_epoch = cfg.epochs + 1

    budget = 60 * cfg.max_minutes if cfg.max_minutes else None
    t_start = time.perf_counter() - spent

    def fraction() -> float:  # how far through the run: by steps, or by the budget if that is further on
        return max(step / total_steps, (time.perf_counter() - t_start) / budget if budget else 0.0)

    bar = None
    if show_bar:
        from tqdm import tqdm
        # In hundredths of the run: the fraction the schedule follows.
        bar = tqdm(total=100.0, initial=round(100 * step / total_steps, 2), dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}")
    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        recipe.start_epoch(epoch)
        batches = length_batches(lengths, cfg.batch_size, rng)
        t0, seen, loss_sum, logs_sum = time.perf_counter(), 0, 0.0, {}
        for idx in batches:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(cfg, step, fraction())
            batch = TrainBatch([samples[i] for i in idx], idx, rng)
            with mixed_precision(model, low):
                loss, logs = recipe.loss(model, batch)
            if not torch.isfinite(loss):
                raise RecmergeError(f"training diverged at epoch {epoch} (loss {loss.item()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v) * len(idx)
            done = fraction()
            if bar is not None:
                bar.update(min(100.0, round(100 * done, 2)) - bar.n)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}",
                                seq_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
            if progress:
                progress("train", min(1.0, done))
        train_s = time.perf_counter() - t0
        out_of_time = budget is not None and time.perf_counter() - t_start > budget
        last = epoch == cfg.epochs or out_of_time
        row = {"epoch": epoch, "loss": loss_sum / seen, "train_seconds": train_s,
               "sequences_per_s": seen / train_s, "lr": opt.param_groups[0]["lr"],
               **{k: v / seen for k, v in logs_sum.items()}, **recipe.end_epoch()}
        stop = last
        if epoch % cfg.eval_every == 0 or last:
            valid = evaluate(model, ds, split="valid", protocols=("full",), device=device)["full"]
            row.update({f"valid_{k}": v for k, v in valid.items()})
            if valid["ndcg@10"] > best[0]:
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best, bad_evals = (valid["ndcg@10"], epoch, state, valid), 0
            else:
                bad_evals += 1
            stop = stop or bool(cfg.patience and bad_evals >= cfg.patience)
            if bar is not None:
                bar.write(f"epoch {epoch}: loss {row['loss']:.4f}  valid ndcg@10 {valid['ndcg@10']:.4f}  "
                          f"{train_s:.1f}s ({row['sequences_per_s']:.0f} seq/s)  "
                          f"{(time.perf_counter() - t_start) / 60:.1f} min")
        row["minutes"] = (time.perf_counter() - t_start) / 60
        history.append(row)
        info = {"identity": identity, "epoch": epoch, "step": step, "seconds": time.perf_counter() - t_start,
                "history": history, "bad_evals": bad_evals, "best_ndcg": best[0], "best_epoch": best[1],
                "best_valid": best[3], "recipe_state": recipe.carry_state(), "finished": stop}
        save_state(spath, model=model, extra_params=extra, opt=opt, best_state=best[2], info=info, rng=rng)
        if stop:  # the last epoch always stops, so every run that gets here has a validated best
            break
    if bar is not None:
        bar.close()

    _, best_epoch, best_state, best_valid = best
    seconds = time.perf_counter() - t_start
    # No timings in the checkpoint: the same seed and data must give the same bytes (the store dedupes
    # by sha256, and a re-run job must reproduce its artifact); timings live in the log beside it.
    summary = {"best_epoch": best_epoch, "epochs_run": len(history), "valid": best_valid,
               "config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "threads")},
               "precision": str(low or torch.float32)}
    meta = CheckpointMeta(backbone=bcfg, recipe=recipe.to_json(), dataset_fingerprint=ds.fingerprint,
                          n_items=ds.n_items, created_by=CREATED_BY,
                          extra={"train": json.dumps(summary, sort_keys=True)})
    sha = save_checkpoint(out, best_state, meta)
    log_path = out.with_name(out.name.removesuffix(".safetensors") + ".log.json")
    log_path.write_text(json.dumps({"summary": {**summary, "seconds": round(seconds, 2)}, "epochs": history},
                                   indent=1))
    return TrainResult(out, sha, best_epoch, best_valid, history, seconds, log_path)
