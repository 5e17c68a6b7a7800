"""Train the zoo models on Fashion-MNIST and write their checkpoints and recorded accuracy.

    python -m compressor.models.train [--models vgg,resnet20] [--epochs N] [--seed 0]

Reproducible: each model starts from ``--seed`` (weights, shuffling and augmentation), and torch
runs in deterministic mode; the same machine, thread count and torch version give the same
checkpoint. AdamW with a one-cycle learning-rate schedule; the convolutional models train under
bfloat16 autocast (several times faster on CPUs with AMX or AVX-512 BF16, and the weights stay
float32). Checkpoints are float32 state dicts in ``models/checkpoints/<name>.pt``; the test
accuracy (full 10k test set, and its first 2000 images, which are the bundled
``models/data/fashion_mnist_eval.npz``) goes to ``models/checkpoints/accuracy.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from compressor.data import load_data
from compressor.models import zoo

ACCURACY_FILE = zoo.CHECKPOINT_DIR / "accuracy.json"
EVAL_SUBSET_SIZE = 2000  # the first test images, bundled as models/data/fashion_mnist_eval.npz


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is trained. Epochs are sized for about 6 minutes on 2 CPU cores."""

    epochs: int
    max_lr: float
    batch_size: int = 128
    weight_decay: float = 5e-4
    bf16: bool = True  # bfloat16 autocast for the forward pass


RECIPES: dict[str, Recipe] = {
    "mlp": Recipe(epochs=15, max_lr=1e-3, bf16=False),
    "lenet5": Recipe(epochs=20, max_lr=3e-3, bf16=False),
    "vgg": Recipe(epochs=6, max_lr=3e-3),
    "resnet20": Recipe(epochs=4, max_lr=4e-3),
    "mobilenetv2": Recipe(epochs=3, max_lr=4e-3),
}


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and make torch pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Class predictions of ``model`` (eval mode, float32) for ``x``."""
    model.eval()
    out = [
        model(torch.from_numpy(x[i : i + batch_size])).argmax(1).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


def train_model(
    name: str,
    recipe: Recipe,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    seed: int,
    augment: bool,
    console: Console,
) -> torch.nn.Module:
    """Train zoo model ``name`` from scratch; returns it in eval mode."""
    seed_everything(seed)
    model = zoo.get(name).build()
    conv = recipe.bf16  # the conv nets also gain from NHWC kernels
    if conv:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(train_x) + recipe.batch_size - 1) // recipe.batch_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.max_lr, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(name, total=recipe.epochs * steps_per_epoch, loss=float("nan"))
        for epoch in range(recipe.epochs):
            model.train()
            order = torch.randperm(len(train_x), generator=generator)
            total_loss, correct, started = 0.0, 0, time.perf_counter()
            for step in range(steps_per_epoch):
                index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
                xb, yb = train_x[index], train_y[index]
                if augment:  # random horizontal flips, per sample
                    flip = torch.rand(len(xb), generator=generator) < 0.5
                    xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
                if conv:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                    logits = model(xb)
                    loss = loss_fn(logits.float(), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += loss.item() * len(xb)
                correct += int((logits.argmax(1) == yb).sum())
                progress.update(task, advance=1, loss=loss.item())
            console.print(
                f"{name} epoch {epoch + 1}/{recipe.epochs}: loss {total_loss / len(train_x):.4f}, "
                f"train accuracy {100 * correct / len(train_x):.2f}%, "
                f"{time.perf_counter() - started:.0f} s"
            )
    return model.to(memory_format=torch.contiguous_format).eval()


def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    """Write the float32 state dict atomically (a half-written checkpoint never lands)."""
    state = {
        k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def record_accuracy(name: str, record: dict, path: Path = ACCURACY_FILE) -> None:
    """Merge one model's record into accuracy.json (sorted by zoo order).

    The file stays locked meanwhile, so that trainings run side by side (``--models a`` and
    ``--models b`` in two processes) do not drop each other's records.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        records = json.loads(text) if text.strip() else {}
        records[name] = record
        ordered = {n: records[n] for n in zoo.names() if n in records}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(ordered, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default=",".join(zoo.names()), help="comma-separated zoo names (default: all)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="override every recipe's number of epochs"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--augment", action="store_true", help="random horizontal flips")
    parser.add_argument("--fp32", action="store_true", help="train without bfloat16 autocast")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        zoo.get(name)  # unknown names fail before any training
    torch.set_num_threads(args.threads)
    console = Console()
    train = load_data("fashion-mnist", split="train")
    test = load_data("fashion-mnist", split="test")
    train_x, train_y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    console.print(
        f"train {train.x.shape}, test {test.x.shape}, torch {torch.__version__}, "
        f"{args.threads} threads"
    )

    for name in names:
        recipe = RECIPES[name]
        if args.epochs is not None:
            recipe = dataclasses.replace(recipe, epochs=args.epochs)
        if args.fp32:
            recipe = dataclasses.replace(recipe, bf16=False)
        started = time.perf_counter()
        model = train_model(name, recipe, train_x, train_y, args.seed, args.augment, console)
        train_seconds = time.perf_counter() - started
        save_state_dict(model, zoo.get(name).checkpoint)
        # Evaluate the checkpoint as users will load it, not the in-memory training copy.
        model = zoo.load_pretrained(name)
        correct = predict(model, test.x) == test.y
        record = {
            "test_accuracy": round(100 * float(correct.mean()), 2),
            "eval_subset_accuracy": round(100 * float(correct[:EVAL_SUBSET_SIZE].mean()), 2),
            "epochs": recipe.epochs,
            "params": sum(p.numel() for p in model.parameters()),
            "seed": args.seed,
            "train_seconds": round(train_seconds),
            "bf16_autocast": recipe.bf16,
            "augment": args.augment,
            "threads": args.threads,
            "torch": torch.__version__,
        }
        record_accuracy(name, record)
        console.print(
            f"[green]{name}[/]: test accuracy {record['test_accuracy']:.2f}%, "
            f"eval subset {record['eval_subset_accuracy']:.2f}%, {train_seconds:.0f} s"
        )


if __name__ == "__main__":
    main()
