"""Epoch time of robustcnn's training loop against the bare floor and the conventional torchvision path.

    python benchmarks/bench_train.py                 # default model, a quarter of a Fashion-MNIST epoch each
    python benchmarks/bench_train.py --fraction 1 --model simple

Three ways to train the same model (same architecture, initial weights, optimizer, batch size, memory format) on the
same number of Fashion-MNIST training images; only the path that feeds the batches differs:

  ours          robustcnn.train.train: uint8 tensors in memory, batches by indexing, metrics, LR schedule, seeds
  floor         forward + backward + optimizer step on float batches made beforehand (nothing else)
  conventional  torchvision.datasets.FashionMNIST(transform=ToTensor()) + DataLoader(shuffle=True)

Times are scaled to one full epoch (60,000 images); each path is measured ``--rounds`` times, interleaved, and the
fastest round counts. Target: ours <= 1.10x the floor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from robustcnn.data import cache_dir, channel_stats, load_dataset, to_float  # noqa: E402
from robustcnn.device import default_batch_size, resolve_device  # noqa: E402
from robustcnn.train import TrainConfig, _optimizer, seeded, train  # noqa: E402
from robustcnn.models import build_model  # noqa: E402
from robustcnn.perf import keep_freed_memory  # noqa: E402


def _fresh_model(config: TrainConfig, mean, std, device):
    with seeded(config.seed, device):
        model = build_model(config.model, in_channels=1, image_size=28, num_classes=10, mean=mean, std=std,
                            **config.arch_args)
    model = model.to(device, memory_format=torch.channels_last).train()
    return model, _optimizer(config, model)


def _step(model, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(config: TrainConfig, data, test, device) -> float:
    """Seconds of the training epoch as robustcnn.train measures it (setup and final evaluation excluded)."""
    result = train(config, data, test, device=device)
    return result.meta["history"][0]["seconds"]


def time_floor(config: TrainConfig, data, device, mean, std) -> float:
    """Seconds for forward + backward + step over pre-made, pre-shuffled float batches already on the device."""
    model, optimizer = _fresh_model(config, mean, std, device)
    b, n = config.batch_size, config.limit
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
    batches = [(to_float(data.images[i], device).contiguous(memory_format=torch.channels_last), data.labels[i].to(device))
               for i in order.split(b) if len(i) == b]
    _sync(device)
    start = time.perf_counter()
    for x, y in batches:
        _step(model, optimizer, x, y)
    _sync(device)
    return time.perf_counter() - start


def time_conventional(config: TrainConfig, device, mean, std) -> float:
    """Seconds for the tutorial pipeline: FashionMNIST(ToTensor()) + DataLoader, batches moved to the device."""
    from torchvision import datasets, transforms

    dataset = datasets.FashionMNIST(str(cache_dir()), train=True, download=False, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         pin_memory=device.type == "cuda")
    model, optimizer = _fresh_model(config, mean, std, device)
    steps = config.limit // config.batch_size
    _sync(device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        _step(model, optimizer, x, y.to(device, non_blocking=True))
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TrainConfig.model, help="architecture (default: the default model)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: per device)")
    parser.add_argument("--fraction", type=float, default=0.25, help="fraction of an epoch to time (default 0.25)")
    parser.add_argument("--rounds", type=int, default=2, help="measure each path this many times, interleaved; "
                        "report the fastest (default 2: robust to a busy machine)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings alone")
    args = parser.parse_args()
    tuned = not args.default_malloc and keep_freed_memory()  # same for all three paths
    device = resolve_device(args.device)
    data = load_dataset("fashion-mnist", train=True)  # also decompresses the files into the cache, for (c)
    test = load_dataset("fashion-mnist", train=False).subset(500)
    batch = args.batch_size or default_batch_size(device, training=True)
    limit = max(batch, int(len(data) * args.fraction) // batch * batch)
    config = TrainConfig(model=args.model, batch_size=batch, epochs=1, limit=limit)
    mean, std = channel_stats(data.images[:limit])
    print(f"{config.model} {config.arch_args}, batch {batch}, {limit:,} images per measurement, {device}, "
          f"{torch.get_num_threads()} threads, malloc {'tuned' if tuned else 'default'}", flush=True)
    time_floor(TrainConfig(**{**config.to_dict(), "limit": 4 * batch}), data, device, mean, std)  # warm-up
    paths = {
        "floor": lambda: time_floor(config, data, device, mean, std),
        "ours": lambda: time_ours(config, data, test, device),
        "conventional": lambda: time_conventional(config, device, mean, std),
    }
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(max(1, args.rounds)):
        for name, measure in paths.items():
            runs[name].append(measure() * len(data) / limit)
    times = {name: min(seconds) for name, seconds in runs.items()}
    print(f"{'path':<14}{'epoch (s)':>10}{'img/s':>9}{'x floor':>9}")
    for name, seconds in times.items():
        print(f"{name:<14}{seconds:>10.1f}{len(data) / seconds:>9,.0f}{seconds / times['floor']:>9.2f}")
    print(f"ours / floor = {times['ours'] / times['floor']:.3f} (target <= 1.10); "
          f"conventional / ours = {times['conventional'] / times['ours']:.2f}")


if __name__ == "__main__":
    main()
