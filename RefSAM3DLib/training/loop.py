"""The training loop (paper section 4.1.2): AdamW, linear schedule with warm-up, BCE + Dice per prompt.

``train(config)`` prepares (or reuses) the cache and prompt table, builds the model with a
:class:`~.prompts.TableTextEncoder` (no text-encoder weights needed), and trains only the
parameters that require gradients. Output folder:

* ``checkpoint/`` -- the latest RefSAM3D checkpoint (``save_checkpoint``: trainable parameters as
  safetensors + ``config.json``) plus ``training_state.pt`` (optimizer, scheduler, step, RNG) for
  ``resume``; written every ``checkpoint_every`` steps, at the end, on Ctrl-C and on SIGTERM;
* ``best/`` -- the checkpoint with the best whole-volume validation Dice (:mod:`.validation`);
* ``log.csv`` (step, loss, lr, seconds, val_dice), ``curves.png``, ``validation.json``,
  ``config.json`` (the resolved config).

Multi-GPU: launched by ``torchrun``, each rank trains on its own sample ids with DDP; rank 0
validates, logs and saves.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoint import build_untrained, load_model, save_checkpoint, upgrade
from ..errors import RefSAM3DError
from ..model.prompt_encoder import NO_TEXT_PROMPT
from .cache import model_space, read_manifest
from .config import load_config, model_config
from .gestures import gesture_rounds, subset
from .loss import PromptLoss
from .prepare import PROMPT_TABLE, prepare
from .prompts import PromptTable, TableTextEncoder
from .validation import validate_whole_volumes
from .windows import CaseStore, WindowDataset, collate

STATE_FILE = "training_state.pt"
LOG_FIELDS = ["step", "loss", "lr", "seconds", "val_dice"]
CALIBRATION_STEPS = 20


class LinearWarmupDecay:
    """LR factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``.

    A callable object (not a lambda) so LambdaLR's state_dict keeps ``total`` for resume.
    """

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = int(warmup)
        self.total = int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


class MultiPromptStep(nn.Module):
    """ONE image-encoder pass for a batch of windows, each decoded with its own prompts.

    Args:
        model: the RefSAM3D.

    ``forward(image (B, 1, D, H, W), texts: B lists of P_b strings) -> B tensors (1, P_b, D, H, W)``.
    A module (not a function) so DDP sees the whole step in its forward.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, texts: list[list[str]]) -> list[torch.Tensor]:
        features = self.model.encode_image(image)
        if image.shape[0] == 1:
            return [self.model.decode(image, features, self.model.encode_prompts(texts[0]))]
        return [
            self.model.decode(image[b:b + 1], features.select(b), self.model.encode_prompts(t))
            for b, t in enumerate(texts)
        ]


class GestureStep(MultiPromptStep):
    """``MultiPromptStep`` plus simulated gestures (:mod:`.gestures`) on the same encoder pass:
    each window is decoded from its text alone (round 0, exactly the text-only step), then its
    present structures (at most ``max_structures``) for ``rounds`` rounds of box and clicks; in a
    fraction ``no_text_prob`` of the windows those rounds carry no text, as a user's "the structure
    at this point" does.

    Args:
        model: the RefSAM3D.
        settings: the config's ``interactive`` section.

    ``forward(image (B, 1, D, H, W), texts: B lists, targets: B tensors (P_b, D, H, W)[, loss_targets:
    the same shapes, what the loss scores against (default: targets)])`` -> B lists of ``(logits
    (1, P, D, H, W), loss target (P, D, H, W))``: the text-only pair first, then one per round.
    """

    def __init__(self, model: nn.Module, settings: dict) -> None:
        super().__init__(model)
        self.settings = settings

    def forward(self, image: torch.Tensor, texts: list[list[str]], targets: list[torch.Tensor],
                loss_targets: list[torch.Tensor] | None = None) -> list[list]:
        features = self.model.encode_image(image)
        out = []
        for b, (window_texts, target, loss_target) in enumerate(zip(texts, targets, loss_targets or targets)):
            window, window_features = image[b:b + 1], features.select(b)
            prompts = self.model.encode_prompts(window_texts)
            logits = self.model.decode(window, window_features, prompts)
            pairs = [(logits, loss_target)]
            present = torch.nonzero(target.flatten(1).any(dim=1)).flatten()
            present = present[torch.randperm(len(present))[: self.settings["max_structures"]]].sort().values.tolist()
            if present:
                chosen, first_logits = subset(prompts, present), logits[:, present]
                if self.settings["no_text_prob"] and float(torch.rand(1)) < self.settings["no_text_prob"]:
                    # Gestures alone: no text, and the first click lands in the whole structure.
                    chosen = self.model.encode_prompts([NO_TEXT_PROMPT] * len(present))
                    first_logits = torch.full_like(first_logits, -1.0)

                def decode(points, labels, boxes, chosen=chosen, window=window, window_features=window_features):
                    return self.model.decode(window, window_features, chosen, points_dhw=points,
                                             point_labels=labels, boxes_dhw=boxes)

                rounds = gesture_rounds(decode, first_logits, target[present], self.settings["rounds"],
                                        self.settings["box_prob"], self.settings["box_jitter"],
                                        self.settings["inside_click_prob"], self.settings["box_alone_prob"],
                                        self.settings["interior_click_prob"])
                pairs += [(round_logits, loss_target[present]) for round_logits in rounds]
            out.append(pairs)
        return out


def gesture_loss(loss_fn: nn.Module, pairs: list, weight: float, device) -> torch.Tensor:
    """One window's loss: the text-only term plus ``weight`` times the mean over gesture rounds."""
    text = loss_fn(pairs[0][0].float(), pairs[0][1].to(device)[None].float())
    if len(pairs) == 1:
        return text
    rounds = [loss_fn(lg.float(), tg.to(device)[None].float()) for lg, tg in pairs[1:]]
    return text + weight * sum(rounds) / len(rounds)


def parameter_groups(model: nn.Module, lr: float, click_prior_lr_scale: float) -> list[dict]:
    """The optimiser's parameter groups: one, or two when the click prior learns at its own rate.

    A single group when the scale is 1, so that runs started before the option resume as they were.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if click_prior_lr_scale == 1:
        return [{"params": [p for _, p in trainable]}]
    prior = [p for name, p in trainable if ".click_prior." in f".{name}"]
    if not prior:
        raise RefSAM3DError("training.click_prior_lr_scale is set but the model has no click prior "
                            "(its config's click_prior is off); remove the option or use a model with one")
    rest = [p for name, p in trainable if ".click_prior." not in f".{name}"]
    return [{"params": rest}, {"params": prior, "lr": lr * click_prior_lr_scale}]


def freeze_all_but(model: nn.Module, prefixes: list[str]) -> list[nn.Parameter]:
    """Stop training every parameter whose name starts with none of ``prefixes`` (empty: train
    all); returns the parameters frozen here. RefSAM3DError for a prefix that names no parameter."""
    if not prefixes:
        return []
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name, _ in named):
            raise RefSAM3DError(f"training.trainable: no trainable parameter of this model starts with '{prefix}' "
                                f"(its modules: {sorted({name.split('.')[0] for name, _ in named})}); fix the config")
    frozen = [p for name, p in named if not name.startswith(tuple(prefixes))]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


@contextmanager
def unfrozen(parameters: list[nn.Parameter]):
    """``parameters`` marked trainable while a checkpoint is written: a checkpoint stores what the
    model trains (``trainable_state_dict``), which includes what this run keeps fixed."""
    for p in parameters:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(False)


def train(config: dict | str | Path, resume: bool = False, init: str | Path | None = None,
          max_cases: int | None = None, device: str = "auto", progress: bool = True,
          stop_after: int | None = None) -> Path:
    """Train (or fine-tune) a RefSAM3D from a training config.

    Args:
        config: a config dict or YAML/JSON file (see ``configs/train_small.yaml``).
        resume: continue from ``<output>/checkpoint`` exactly (model, optimizer, schedule, step, RNG);
            a ``training.steps`` different from the run's re-plans where its schedule ends.
        init: a model folder to start from (few-shot fine-tuning) instead of random weights.
        max_cases: train on only this many training cases (a seeded choice).
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        progress: show a progress bar and messages (rank 0).
        stop_after: stop after this many steps of this call, with a resumable checkpoint (the
            schedule still spans ``training.steps``).
    Returns:
        the output folder.
    """
    cfg = load_config(config)
    t = cfg["training"]
    rank, world = _init_distributed()
    main = rank == 0
    device = _device(device, rank if world > 1 else None)
    out = Path(cfg["output"])
    if resume and init:
        raise RefSAM3DError("--resume continues a run and --init starts a new one from a model; use one of them")
    if resume and not (out / "checkpoint" / STATE_FILE).is_file():
        raise RefSAM3DError(f"nothing to resume in {out}: no checkpoint/{STATE_FILE}; start without --resume")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        prepare(cfg, progress=progress)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
    _barrier(world)

    cache_dir = Path(cfg["cache"])
    manifest = read_manifest(cache_dir)
    train_entries = [e for e in manifest["cases"] if e["split"] == "train"]
    val_entries = [e for e in manifest["cases"] if e["split"] == "validation"]
    if max_cases:
        picked = np.random.default_rng(t["seed"]).permutation(len(train_entries))[:max_cases]
        train_entries = [train_entries[i] for i in sorted(picked)]
    if not train_entries:
        raise RefSAM3DError("no training cases after the split; check 'datasets' and 'split' in the config")
    table = PromptTable(cache_dir / PROMPT_TABLE)
    architecture = model_config(cfg)
    text_encoder = TableTextEncoder(table, architecture.text_context_length)

    torch.manual_seed(t["seed"])  # the same initial weights on every rank and in every rerun
    if resume:
        model = load_model(out / "checkpoint", device="cpu", text_encoder=text_encoder)
    elif init:
        model = upgrade(load_model(init, device="cpu", text_encoder=text_encoder), architecture)
    else:
        model = build_untrained(architecture, text_encoder=text_encoder)
    if model_space(model.config) != manifest["model_space"]:
        raise RefSAM3DError(
            f"the model works at {model_space(model.config)}, the cache {cache_dir} at {manifest['model_space']}; "
            "set 'model' in the config to the model's own config (or another 'cache' folder)"
        )
    model.base_weights.update(table.base_weights)
    model.to(device).train()
    frozen = freeze_all_but(model, t["trainable"])
    groups = parameter_groups(model, t["lr"], t["click_prior_lr_scale"])
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=t["lr"], weight_decay=t["weight_decay"], betas=tuple(t["betas"]))
    auto_steps = t["steps"] == "auto"
    if auto_steps and not t["max_minutes"]:
        raise RefSAM3DError("training.steps 'auto' needs training.max_minutes; set one of them to a number")
    # "auto": an upper bound (>= 50 ms per step) until the measured speed fixes the horizon.
    horizon = int(t["max_minutes"] * 60 * 20) if auto_steps else int(t["steps"])
    schedule = LinearWarmupDecay(t["warmup_steps"], horizon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step, best, elapsed_before = 0, -1.0, 0.0
    if resume:
        state = _read_training_state(out / "checkpoint" / STATE_FILE)
        if len(state["optimizer"]["param_groups"]) != len(optimizer.param_groups):
            raise RefSAM3DError(
                f"the run in {out} was started with another training.click_prior_lr_scale (its optimiser has "
                f"{len(state['optimizer']['param_groups'])} parameter groups, this config gives "
                f"{len(optimizer.param_groups)}); resume with the run's own config or start a new run")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, elapsed_before = int(state["step"]), float(state["best_val"]), float(state["elapsed_s"])
        auto_steps = auto_steps and not state["horizon_fixed"]
        if not auto_steps and t["steps"] != "auto" and int(t["steps"]) != schedule.total:
            # A re-planned end (``--resume --steps N``): the linear decay now reaches 0 at step N.
            # The samples stay those of the uninterrupted run (a sample is a function of its id).
            schedule.total = max(step + 1, int(t["steps"]))
        horizon = schedule.total
    else:
        torch.manual_seed(t["seed"] + 1 + rank)

    gestures = cfg["interactive"] if cfg["interactive"]["enabled"] else None
    step_module = GestureStep(model, gestures) if gestures else MultiPromptStep(model)
    if world > 1:
        # Point/box prompt parameters are unused by text-only steps.
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    phrasings = {k: table.phrasings(k) for k in table.structures}
    weights = [t["dataset_weights"].get(e["dataset"], 1.0) for e in train_entries]
    samples_per_step = t["batch_size"] * world
    dataset = WindowDataset(
        CaseStore(cache_dir, train_entries, with_coverage=t["partial_volume_targets"]), phrasings,
        model.config.window_size_vox, model.config.spacing_mm[0],
        seed=t["seed"], length=(horizon - step) * samples_per_step, offset=step * samples_per_step,
        case_weights=weights, max_prompts=cfg["prompts"]["max_prompts"],
        background_prob=cfg["prompts"]["background_prob"],
        augment=cfg["augment"], partial_volume=t["partial_volume_targets"],
    )
    loader = DataLoader(
        dataset, batch_size=t["batch_size"], num_workers=t["num_workers"], collate_fn=collate,
        sampler=DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=True),
        persistent_workers=t["num_workers"] > 0, pin_memory=device.type == "cuda",
    )
    val = CaseStore(cache_dir, val_entries) if main and val_entries else None
    loss_fn = PromptLoss(exclusive_weight=float(t["exclusive_weight"]))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    log = _Log(out / "log.csv", resume_step=step if resume else None) if main else None
    stop = _StopFlag()

    def save(directory_name: str, val_dice: float | None = None) -> None:
        metadata = {
            "step": step, "val_dice": val_dice, "training_config": cfg["_source"], "spatial_prompts": bool(gestures),
            "structures": sorted(table.structures), "datasets": sorted({e["dataset"] for e in train_entries}),
            "train_cases": [e["case_id"] for e in train_entries], "validation_cases": [e["case_id"] for e in val_entries],
        }
        state = {
            "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "best_val": best, "elapsed_s": elapsed_before + time.perf_counter() - started,
            "horizon_fixed": not auto_steps, "torch_rng": torch.get_rng_state(),
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        with unfrozen(frozen):
            _save_checkpoint_dir(model, out / directory_name, metadata, state)

    started = time.perf_counter()
    first_step = step
    step_times: list[float] = []
    bar = _progress(progress and main, horizon, step)
    data = iter(loader)
    if resume:
        # After iter(loader), which draws the workers' base seed from the torch generator.
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    try:
        with stop.installed():
            while step < horizon:
                tic = time.perf_counter()
                batch = next(data)
                image = batch["image"].to(device, non_blocking=True)
                # Gestures are placed on the labels; the loss scores against the loss targets.
                loss_targets = batch["fraction"] if t["partial_volume_targets"] else batch["target"]
                if gestures:
                    targets = [tg.to(device) for tg in batch["target"]]
                    fractions = [tg.to(device) for tg in loss_targets] if t["partial_volume_targets"] else None
                    with autocast:
                        windows = step_module(image, batch["texts"], targets, fractions)
                    loss = sum(gesture_loss(loss_fn, pairs, gestures["weight"], device) for pairs in windows)
                    loss = loss / len(windows)
                else:
                    with autocast:
                        logits = step_module(image, batch["texts"])
                    loss = sum(loss_fn(lg.float(), tg.to(device)[None].float()) for lg, tg in zip(logits, loss_targets))
                    loss = loss / len(logits)
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:  # not when only gesture parameters train and no structure is in view
                    loss.backward()
                if t["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
                optimizer.step()
                scheduler.step()
                step += 1
                step_times.append(time.perf_counter() - tic)
                if auto_steps and len(step_times) == CALIBRATION_STEPS:
                    horizon = _fix_horizon(schedule, step, step_times, t, time.perf_counter() - started, world, device)
                    auto_steps = False
                    if bar is not None:
                        bar.total = horizon
                val_dice = None
                if main and val is not None and (step % t["validate_every"] == 0 or step == horizon):
                    with autocast:
                        scores = validate_whole_volumes(model, val, phrasings, device)
                    val_dice = scores["mean_dice"]
                    (out / "validation.json").write_text(json.dumps({"step": step, **scores}, indent=1))
                    if val_dice > best:
                        best = val_dice
                        save("best", val_dice)
                loss_value = loss.item()
                if main:
                    log.write(step, loss_value, scheduler.get_last_lr()[0], elapsed_before + time.perf_counter() - started, val_dice)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss_value:.3f}", dice=f"{best:.3f}" if best >= 0 else "-")
                    if step % t["checkpoint_every"] == 0:
                        save("checkpoint")
                        _plot(out)
                minutes = (time.perf_counter() - started) / 60
                over = bool(t["max_minutes"] and minutes >= t["max_minutes"]) or step - first_step == stop_after
                if _any_rank(stop.requested or over, world, device):
                    if main and progress:
                        print(f"\nstopping at step {step} ({'signal' if stop.requested else 'budget reached'})", flush=True)
                    break
    except KeyboardInterrupt:
        if main and progress:
            print(f"\ninterrupted at step {step}; saving a checkpoint to resume from", flush=True)
    finally:
        if bar is not None:
            bar.close()
    if main:
        save("checkpoint")
        _plot(out)
    _barrier(world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


def _fix_horizon(schedule: LinearWarmupDecay, step: int, step_times: list[float], t: dict, elapsed: float,
                 world: int, device) -> int:
    """Set the schedule's length from the measured step time so it ends with the time budget."""
    per_step = float(np.median(step_times[len(step_times) // 4:]))
    if world > 1:  # every rank must agree: the slowest sets the pace
        slowest = torch.tensor([per_step, elapsed], device=device)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        per_step, elapsed = slowest.tolist()
    remaining_s = t["max_minutes"] * 60 - elapsed
    # Keep ~5 % of the budget for validation and checkpoints.
    schedule.total = step + max(1, int(0.95 * remaining_s / per_step))
    schedule.warmup = min(schedule.warmup, schedule.total // 10 + 1)
    return schedule.total


def _read_training_state(path: Path) -> dict:
    """The optimizer/schedule/RNG state of a run, read without ever executing pickled code."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        # torch's message advises weights_only=False, which would run whatever the file holds.
        raise RefSAM3DError(
            f"{path} is not a training state this program wrote ({type(error).__name__}); it is not "
            "loaded. Start the run again without --resume, or --init from its checkpoint folder."
        ) from None
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler"} <= set(state):
        raise RefSAM3DError(f"{path} is not a training state this program wrote; start again without --resume.")
    return state


def _save_checkpoint_dir(model, directory: Path, metadata: dict, state: dict) -> None:
    """Write a complete checkpoint folder next to the old one, then swap: never half a checkpoint."""
    fresh = directory.with_name(directory.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    save_checkpoint(model, fresh, metadata)
    torch.save(state, fresh / STATE_FILE)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    fresh.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


class _Log:
    """The CSV log; on resume, rows after the resumed step are dropped (they were never saved)."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows = []
        if resume_step is not None and path.is_file():
            with path.open() as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.handle = path.open("a", newline="")
        self.writer = csv.writer(self.handle)

    def write(self, step: int, loss: float, lr: float, seconds: float, val_dice: float | None) -> None:
        self.writer.writerow([step, f"{loss:.5f}", f"{lr:.3e}", f"{seconds:.1f}", "" if val_dice is None else f"{val_dice:.4f}"])
        self.handle.flush()


def _plot(out: Path) -> None:
    """``curves.png``: training loss (raw and smoothed) and whole-volume validation Dice against step."""
    import matplotlib  # only this picture needs it; Agg first: a training machine has no display

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    val = [(int(r["step"]), float(r["val_dice"])) for r in rows if r["val_dice"]]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, loss, color="0.8", lw=0.5, label="loss")
    k = max(1, len(loss) // 50)
    ax_loss.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color="C0", label=f"mean of {k}")
    ax_loss.set(xlabel="step", ylabel="BCE + Dice loss", title="training loss")
    ax_loss.legend()
    if val:
        ax_val.plot(*zip(*val), "o-", color="C1")
    ax_val.set(xlabel="step", ylabel="mean Dice", ylim=(0, 1), title="validation Dice (whole volumes, one label map)")
    fig.tight_layout()
    tmp = out / "curves.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out / "curves.png")


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


class _StopFlag:
    """SIGTERM sets a flag; the loop saves a checkpoint at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def installed(self):
        flag = self

        class _Installed:
            def __enter__(self):
                self.previous = signal.signal(signal.SIGTERM, flag._handler) if _main_thread() else None
                return flag

            def __exit__(self, *exc):
                if self.previous is not None:
                    signal.signal(signal.SIGTERM, self.previous)
                return False

        return _Installed()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _init_distributed() -> tuple[int, int]:
    """(rank, world size): torchrun's environment starts a process group, else (0, 1)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _any_rank(flag: bool, world: int, device) -> bool:
    """True on every rank when it is True on any (ranks must stop at the same step)."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _device(name: str, local_rank: int | None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RefSAM3DError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        if local_rank is not None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", local_rank)))
        elif device.index is None:
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    return device

