"""``perceiver-fast train``: train a Perceiver, Perceiver IO or ViT on a small image dataset.

The default dataset is scikit-learn's bundled digits (1797 8x8 grey images,
no download), split train/test with a fixed seed. A user's ``.npz`` works too:
``x`` N x H x W x C uint8 and ``y`` N integer labels.

Outputs (in ``out``, created at the first checkpoint): a ``from_pretrained``
folder (``config.json`` and ``model.safetensors``, rewritten after every epoch:
``ViT.from_pretrained(out)`` etc. loads it), ``training.json`` (model family,
label mapping, input normalisation), ``metrics.json`` (per-epoch loss and
accuracy, final test accuracy, wall time; strict JSON) and ``training.png``
(loss and accuracy curves). Every file is written atomically.

Errors are ordinary exceptions: ValueError/TypeError naming the argument for
bad configs and data (raised before any work), :class:`NonFiniteLossError`
when the loss diverges. The ``perceiver-fast train`` command prints them as one
line.

Under ``torchrun`` (WORLD_SIZE > 1) it trains with DistributedDataParallel:
process group from the environment (nccl on GPUs, gloo on CPUs); rank 0 prints
and writes the one checkpoint. With ``batch_size`` (per process) each rank draws
its own batches (a DistributedSampler). With ``global_batch_size`` the run is the
single-process run with that batch, split: every rank draws the same global
batch (same shuffling and augmentation stream, seeded by ``seed``) and takes its
contiguous 1/world of it, and the logged losses and accuracies are those of the
global batch, so the metrics match one process within data-parallel rounding. A
world size that does not divide ``global_batch_size`` is refused up front.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from perceiver_fast.ops.backend import attention_backend
from perceiver_fast.runtime import atomic_write, check_output_dir, resolve_device

MODELS = ("perceiver", "perceiver-io", "vit")


# ---------------------------------------------------------------------------
# data


@dataclass
class Dataset:
    x_train: torch.Tensor  # (N, C, H, W) float32, normalised
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    labels: List[int]  # the original label of each class index
    mean: List[float]  # per-channel normalisation of the inputs (training split)
    std: List[float]

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W)"""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


MAX_CLASSES = 10_000


def load_arrays(dataset: str):
    """(x uint8 N x H x W x C, y int64 N, name) as numpy arrays. Raises ValueError with a one-line reason."""
    import numpy as np

    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        # 0..16 grey levels -> 0..255 uint8, one channel
        x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
        return x, d.target.astype(np.int64), "digits"
    path = os.path.expanduser(dataset)
    if not path.endswith(".npz"):
        raise ValueError(f"dataset must be 'digits' or a .npz file, got {dataset!r}")
    if not os.path.isfile(path):
        raise ValueError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            x, y = (f["x"], f["y"]) if {"x", "y"} <= keys else (None, None)
    except Exception as e:
        raise ValueError(f"cannot read {path} as .npz: {type(e).__name__}: {e}") from None
    if x is None:
        raise ValueError(f"{path} must hold arrays 'x' and 'y'; it holds {sorted(keys) or 'nothing'}")
    if x.ndim != 4 or x.dtype != np.uint8 or 0 in x.shape[1:]:
        raise ValueError(f"x must be an N x H x W x C uint8 array with H, W, C >= 1; {path} has x of shape "
                         f"{tuple(x.shape)} and dtype {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be N integer labels matching x (N = {x.shape[0]}); {path} has y of shape "
                         f"{tuple(y.shape)} and dtype {y.dtype}")
    if x.shape[0] < 10:
        raise ValueError(f"{path} has only {x.shape[0]} examples; need at least 10 to split train/test")
    return x, y.astype(np.int64), os.path.basename(path)


def encode_labels(y, source: str = "y"):
    """Labels -> (class indices 0..K-1, the K original labels in order).

    Sparse or shifted labels ({0, 2000000}, {-1, 1}) are remapped to 0..K-1 (the
    list of originals is saved with the checkpoint), so the head has K outputs,
    not max(y) + 1. Refused, with the reason: fewer than 2 classes, more than
    MAX_CLASSES, or fewer than 2 examples per class on average (ids, not labels).
    """
    import numpy as np

    classes, index = np.unique(y, return_inverse=True)
    k, n = len(classes), len(y)
    if k < 2:
        raise ValueError(f"{source} has a single label ({classes[0] if k else 'none'}); a classifier needs >= 2")
    if k > MAX_CLASSES:
        raise ValueError(f"{source} has {k} distinct labels; at most {MAX_CLASSES} classes are supported")
    if 2 * k > n:
        raise ValueError(f"{source} has {k} distinct labels for {n} examples: fewer than 2 examples per class "
                         f"on average, which looks like ids, not class labels")
    return index.astype(np.int64), [int(c) for c in classes]


def make_dataset(dataset: str, test_fraction: float = 0.2, seed: int = 0, limit: Optional[int] = None) -> Dataset:
    """Loads, checks, remaps the labels, splits train/test with ``seed`` and normalises with the training mean/std."""
    import numpy as np

    x, y, name = load_arrays(dataset)
    if limit:
        x, y = x[:limit], y[:limit]
    y, classes = encode_labels(y, f"y of {name}")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = idx[:n_test], idx[n_test:]
    if len(train) == 0:
        raise ValueError(f"test_fraction {test_fraction} leaves none of the {len(x)} examples to train on")
    xf = x.astype(np.float32) / 255.0
    mean = xf[train].mean(axis=(0, 1, 2), keepdims=True)
    std = xf[train].std(axis=(0, 1, 2), keepdims=True) + 1e-6
    xf = ((xf - mean) / std).transpose(0, 3, 1, 2)  # NHWC -> NCHW, the models' layout
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Dataset(t(xf[train]), t(y[train]), t(xf[test]), t(y[test]), len(classes), name, classes,
                   mean.ravel().tolist(), std.ravel().tolist())


def augment(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to max_shift pixels (zero padded), per image. x (B, C, H, W)."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    rows = (dy[:, None] + torch.arange(H)[None])  # (B, H)
    cols = (dx[:, None] + torch.arange(W)[None])  # (B, W)
    b = torch.arange(B)[:, None, None]
    out = pad[b, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------
# models

# Model keyword arguments for small images (digits: 8x8x1). "tiny" is for tests.
# Digits, 60 epochs, seed 0, 2-core CPU (2026-11-20): vit 96.7% test accuracy (65 s of training),
# perceiver-io 95.3% (72 s), perceiver 85.0% (the keras-style Perceiver learns slowest; patch_size 1: 54.9%).
PRESETS: Dict[str, Dict[str, Dict]] = {
    "perceiver": {
        "default": dict(patch_size=2, num_latents=16, latent_dim=64, cross_heads=1, self_heads=4, depth=2,
                        num_iterations=2, mlp_ratio=2),
        "tiny": dict(patch_size=2, num_latents=4, latent_dim=16, cross_heads=1, self_heads=2, depth=1,
                     num_iterations=1, mlp_ratio=1),
    },
    "perceiver-io": {
        "default": dict(preprocessing="fourier", num_bands=4, num_latents=16, latent_dim=64, num_blocks=2,
                        num_self_attends_per_block=2, self_heads=4),
        "tiny": dict(preprocessing="fourier", num_bands=2, num_latents=4, latent_dim=16, num_blocks=1,
                     num_self_attends_per_block=1, self_heads=2),
    },
    "vit": {
        "default": dict(patch_size=2, dim=64, depth=4, heads=4, mlp_ratio=2.0),
        "tiny": dict(patch_size=4, dim=16, depth=1, heads=2, mlp_ratio=1.0),
    },
}


MAX_PATCH_TOKENS = 256


def patch_size_for(H: int, W: int, preset: int) -> int:
    """The presets are sized for 8x8 digits; a user's larger images get larger patches.

    The smallest patch >= preset that tiles H x W exactly into at most
    MAX_PATCH_TOKENS patches; failing that, the common divisor of H and W that
    gives the fewest patches.
    """
    divisors = [p for p in range(1, math.gcd(H, W) + 1) if H % p == 0 and W % p == 0]
    fits = [p for p in divisors if p >= preset and (H // p) * (W // p) <= MAX_PATCH_TOKENS]
    return fits[0] if fits else divisors[-1]


def build_model(model: str, image_shape, num_classes: int, attention: str, size: str = "default",
                overrides: Optional[Dict] = None) -> Tuple[torch.nn.Module, Dict]:
    """(nn.Module, keyword arguments to rebuild it). image_shape is (C, H, W); the model takes (B, C, H, W)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    from perceiver_fast import models as M

    cls = {"perceiver": M.Perceiver, "perceiver-io": M.PerceiverIO, "vit": M.ViT}[model]
    C, H, W = image_shape
    kw = dict(PRESETS[model][size], **(overrides or {}))
    if kw.get("patch_size"):
        kw["patch_size"] = patch_size_for(H, W, kw["patch_size"])
    kw.update(image_size=(H, W), in_channels=C, num_classes=num_classes, attention=attention)
    try:
        net = cls(**kw)
    except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: e.g. no memory for a huge class count
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot build {model} for images of shape {tuple(image_shape)} and {num_classes} "
                         f"classes: {reason}") from None
    kw["image_size"] = [H, W]
    return net, kw


# ---------------------------------------------------------------------------
# distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: Optional[str]) -> Tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(), dev
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, True), dev


# ---------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    """What ``train`` does; :func:`check_config` range-checks every field before any work."""

    model: str = "vit"
    dataset: str = "digits"
    attention: str = "fused"
    epochs: int = 60
    batch_size: int = 64
    global_batch_size: Optional[int] = None
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    shift: int = 1
    test_fraction: float = 0.2
    seed: int = 0
    size: str = "default"
    max_steps: Optional[int] = None
    limit: Optional[int] = None
    device: Optional[str] = None
    out: str = "runs/train"
    quiet: bool = False


MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take [0, 2**32 - 1]


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Every field range-checked; returns a copy with the device resolved. ValueError/TypeError naming the field."""
    from perceiver_fast.layers.checks import check_float, check_int

    def one_of(name: str, value, choices) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")

    one_of("model", cfg.model, MODELS)
    one_of("attention", cfg.attention, ("fused", "eager"))
    one_of("size", cfg.size, tuple(PRESETS[cfg.model]))
    if not isinstance(cfg.dataset, str) or not cfg.dataset:
        raise ValueError(f"dataset must be 'digits' or a .npz path, got {cfg.dataset!r}")
    check_int("epochs", cfg.epochs)
    check_int("batch_size", cfg.batch_size)
    check_float("lr", cfg.lr, include_minimum=False)
    check_float("weight_decay", cfg.weight_decay)
    check_float("warmup_epochs", cfg.warmup_epochs)
    check_int("shift", cfg.shift, minimum=0)
    check_float("test_fraction", cfg.test_fraction, 0.0, 1.0, include_minimum=False, include_maximum=False)
    if check_int("seed", cfg.seed, minimum=0) > MAX_SEED:
        raise ValueError(f"seed must be <= {MAX_SEED}, got {cfg.seed}")
    for name in ("max_steps", "limit", "global_batch_size"):
        if getattr(cfg, name) is not None:
            check_int(name, getattr(cfg, name))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.global_batch_size is not None and cfg.global_batch_size % world != 0:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by the world size {world} "
                         f"(WORLD_SIZE): every process takes an equal share of the global batch; use a multiple "
                         f"of {world} or another --nproc-per-node")
    device = str(resolve_device(cfg.device)) if cfg.device is not None else None
    check_output_dir(cfg.out)
    return dataclasses.replace(cfg, device=device)


def evaluate(model, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 256) -> Tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            logits = model(xb).float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(-1) == yb).sum().item()
    model.train()
    return loss_sum / len(x), correct / len(x)


def save_plot(history: List[Dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ep = [h["epoch"] for h in history]
    a.plot(ep, [h["train_loss"] for h in history], marker="o", label="train")
    a.plot(ep, [h["test_loss"] for h in history], marker="o", label="test")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.plot(ep, [h["train_acc"] for h in history], marker="o", label="train")
    b.plot(ep, [h["test_acc"] for h in history], marker="o", label="test")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the last checkpoint written (if any) is from a finite epoch."""


def _finite_or_none(value):
    """metrics.json is strict JSON: a non-finite number becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str, obj) -> None:
    """Strict JSON (no NaN/Infinity), written atomically."""
    text = json.dumps(_finite_or_none(obj), indent=1, allow_nan=False)

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path, write)


CHECKPOINT_FILES = ("config.json", "model.safetensors", "training.json")


def save_checkpoint(model, out: str, training: Dict) -> None:
    """A ``from_pretrained`` folder: config.json + model.safetensors (the model's constructor config and
    weights, via its save_pretrained), plus training.json (model family, label mapping, normalisation).

    Saved into a temporary folder inside ``out`` and moved file by file (each file is replaced
    atomically; a user's other files in ``out``, a README.md included, are left alone).
    """
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".checkpoint-", dir=out)
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "training.json"), "w") as fh:
            json.dump(_finite_or_none(training), fh, indent=1, allow_nan=False)
        for name in CHECKPOINT_FILES:  # only ours: save_pretrained also writes a model card (README.md)
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_train_dependencies() -> None:
    missing = []
    for module in ("numpy", "huggingface_hub", "safetensors", "matplotlib"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"training needs {', '.join(missing)}: pip install 'perceiver_fast[train]'")


def _global_sums(values: List[float], dist_info: "Dist") -> List[float]:
    """The sums of ``values`` over the ranks (one all-reduce under DDP; the values themselves otherwise)."""
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _all_finite(loss: torch.Tensor, dist_info: "Dist") -> bool:
    """Whether every rank's loss is finite (one all-reduce under DDP, so that all ranks stop together)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(bad)
    return bad.item() == 0


@dataclass
class Prepared:
    """A checked config with its dataset and model, ready for :func:`fit`."""
    cfg: TrainConfig
    data: Dataset
    model: torch.nn.Module
    model_cfg: Dict


def prepare(cfg: TrainConfig) -> Prepared:
    """Every check before any work: the fields of ``cfg`` (ValueError/TypeError naming the field), the
    dependencies (ImportError), the dataset and the model. Nothing is written."""
    cfg = check_config(cfg)
    _check_train_dependencies()
    # Data and model before the process group: a bad dataset fails fast, on every rank alike.
    data = make_dataset(cfg.dataset, cfg.test_fraction, cfg.seed, cfg.limit)
    if cfg.global_batch_size is not None and cfg.global_batch_size > len(data.x_train):
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is larger than the {len(data.x_train)} "
                         f"training examples of {data.name}")
    torch.manual_seed(cfg.seed)
    model, model_cfg = build_model(cfg.model, data.image_shape, data.num_classes, cfg.attention, cfg.size)
    return Prepared(cfg, data, model, model_cfg)


def train(cfg: TrainConfig) -> Dict:
    """Train; returns the metrics dict (also written to out/metrics.json).

    :func:`prepare` checks everything first; ``out`` is created at the first
    checkpoint, so a rejected run leaves nothing behind. A checkpoint is written
    after every epoch; a NaN/inf loss stops the run with NonFiniteLossError,
    keeping the last checkpoint, which is from an epoch whose losses were finite.
    """
    return fit(prepare(cfg))


def fit(prepared: Prepared) -> Dict:
    """The training run of :func:`train` on what :func:`prepare` returned; errors here propagate as they are."""
    cfg, data, model, model_cfg = prepared.cfg, prepared.data, prepared.model, prepared.model_cfg
    dist_info, device = init_distributed(cfg.device)
    log = (lambda *a: print(*a, flush=True)) if dist_info.main and not cfg.quiet else (lambda *a: None)
    try:
        model = model.to(device)
        nparam = sum(p.numel() for p in model.parameters())
        log(f"{cfg.model} ({nparam / 1e3:.1f}k params, attention={cfg.attention}) on {data.name}: "
            f"{len(data.x_train)} train / {len(data.x_test)} test images of {data.image_shape}, "
            f"{data.num_classes} classes, device {device}" +
            (f", DDP world {dist_info.world}" if dist_info.enabled else ""))
        if cfg.attention == "fused" and device.type == "cpu":
            log(f"fused attention on CPU runs the ops' {attention_backend(device)} path (the Triton kernels "
                f"need a GPU)")
        net = model
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_set = torch.utils.data.TensorDataset(data.x_train, data.y_train)
        sampler = None
        exact = cfg.global_batch_size is not None  # every rank draws the global batch and takes its share
        batch = cfg.global_batch_size if exact else cfg.batch_size
        if dist_info.enabled and not exact:
            sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist_info.world,
                                                          rank=dist_info.rank, shuffle=True, seed=cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed + (0 if exact else dist_info.rank))
        loader = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=sampler is None,
                                             sampler=sampler, drop_last=exact or len(train_set) > batch,
                                             generator=gen)
        steps_per_epoch = max(1, len(loader))
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        decay, no_decay = [], []
        for p in model.parameters():
            (no_decay if p.ndim < 2 else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        training = dict(model=cfg.model, image_shape=list(data.image_shape), num_classes=data.num_classes,
                        labels=data.labels, mean=data.mean, std=data.std, attention=cfg.attention,
                        dataset=data.name)
        history: List[Dict] = []
        step_losses: List[float] = []
        step = 0
        t0 = time.time()
        epoch = 0

        def metrics() -> Dict:
            return dict(config=asdict(cfg), model_config=model_cfg, params=nparam, device=str(device),
                        world_size=dist_info.world, history=history, step_losses=step_losses,
                        test_acc=history[-1]["test_acc"] if history else None,
                        test_loss=history[-1]["test_loss"] if history else None,
                        train_time_s=round(time.time() - t0, 2), torch=torch.__version__)

        while step < total:
            epoch += 1
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for xb, yb in loader:
                if step >= total:
                    break
                xb = augment(xb, cfg.shift, gen)
                if exact and dist_info.enabled:
                    share = len(xb) // dist_info.world  # the config check made it divide (drop_last too)
                    xb, yb = (t[dist_info.rank * share:(dist_info.rank + 1) * share] for t in (xb, yb))
                xb, yb = xb.to(device), yb.to(device)
                logits = net(xb).float()
                loss = F.cross_entropy(logits, yb)
                if not _all_finite(loss, dist_info):
                    where = (f"the last good checkpoint (epoch {epoch - 1}) is in {cfg.out}" if epoch > 1
                             else "no checkpoint was written")
                    raise NonFiniteLossError(f"the training loss is {loss.item()} at epoch {epoch}, step {step + 1}; "
                                             f"stopped ({where}); try a lower lr than {cfg.lr}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                step_loss, step_seen = loss.item() * len(yb), len(yb)
                step_correct = (logits.argmax(-1) == yb).sum().item()
                if exact:  # the global batch's numbers, as one process would log them
                    step_loss, step_correct, step_seen = _global_sums([step_loss, step_correct, step_seen], dist_info)
                step_losses.append(step_loss / step_seen if exact else loss.item())
                loss_sum += step_loss
                correct += int(step_correct)
                seen += int(step_seen)
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test, device)
            h = dict(epoch=epoch, step=step, train_loss=loss_sum / max(seen, 1), train_acc=correct / max(seen, 1),
                     test_loss=test_loss, test_acc=test_acc, elapsed_s=round(time.time() - t0, 2))
            history.append(h)
            log(f"epoch {epoch:3d} step {step:5d}/{total}  loss {h['train_loss']:.4f}  train acc {h['train_acc']:.3f}"
                f"  test loss {test_loss:.4f}  test acc {test_acc:.4f}  {h['elapsed_s']:.1f} s")
            if dist_info.main:
                save_checkpoint(model, cfg.out, training)
                write_json(os.path.join(cfg.out, "metrics.json"), metrics())
        result = metrics()
        if dist_info.main:
            save_plot(history, os.path.join(cfg.out, "training.png"),
                      f"{cfg.model} on {data.name}, attention={cfg.attention}: test acc {result['test_acc']:.4f}")
            log(f"test accuracy {result['test_acc']:.4f} after {epoch} epochs, {result['train_time_s']:.1f} s; "
                f"wrote {cfg.out}/config.json, model.safetensors, training.json, metrics.json, training.png")
        if dist_info.enabled:
            import torch.distributed as dist

            # Every rank waits for rank 0's outputs before the group is torn down: a rank that destroys its gloo
            # group while a peer still holds it open can abort at exit ("terminate called without an active
            # exception", seen once in CI).
            dist.barrier()
        return result
    finally:
        if dist_info.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
