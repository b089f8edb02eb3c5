"""Where a command's model and images come from: ``--model``/``--checkpoint`` and ``--data``, with their options.

Every command that takes a model declares the option types below and builds a :class:`ModelChoice` and a
:class:`DataChoice` from them; loading, the checks that the two fit, and the record reports embed happen here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from robustcnn.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from robustcnn.data import ImageData

MODEL_PANEL = "Model"
DATA_PANEL = "Data"

ModelSpec = Annotated[Optional[str], typer.Option(
    "--model", help="The model to attack: a robustcnn checkpoint, a TorchScript file, a torch.export program (.pt2, "
    "dynamic batch) or package.module:factory (with --weights). Default: --checkpoint, else the newest run.",
    rich_help_panel=MODEL_PANEL)]
Weights = Annotated[Optional[Path], typer.Option(
    "--weights", help="State dict for --model package.module:factory (read with torch.load(weights_only=True)).",
    rich_help_panel=MODEL_PANEL)]
Mean = Annotated[Optional[str], typer.Option(
    "--mean", help="Per-channel mean the model expects its inputs normalized with, e.g. 0.485,0.456,0.406; "
    "budgets stay in [0, 1] pixel units.", rich_help_panel=MODEL_PANEL)]
Std = Annotated[Optional[str], typer.Option(
    "--std", help="Per-channel std that goes with --mean.", rich_help_panel=MODEL_PANEL)]
OutputIndex = Annotated[Optional[str], typer.Option(
    "--output-index", help="The logits among the model's outputs: an index of a tuple or a key of a dict.",
    rich_help_panel=MODEL_PANEL)]
LogitsFromProbs = Annotated[bool, typer.Option(
    "--logits-from-probs", help="The model returns probabilities: attack their log (clamped away from 0).",
    rich_help_panel=MODEL_PANEL)]
DataSpec = Annotated[Optional[str], typer.Option(
    "--data", help="Images: a built-in dataset name, a folder of class sub-folders (ImageFolder layout) or an .npz "
    "file with x and y. Default: the dataset the model was trained on.", rich_help_panel=DATA_PANEL)]
Split = Annotated[str, typer.Option(
    "--split", help="Split to read: train or test (built-in), <folder>/<split>/ if it exists, x_<split> in .npz.",
    rich_help_panel=DATA_PANEL)]
ImageSize = Annotated[Optional[int], typer.Option(
    "--image-size", help="Resize the images to this many pixels square.", rich_help_panel=DATA_PANEL)]
Grayscale = Annotated[bool, typer.Option(
    "--grayscale", help="Turn RGB images into one luminance channel.", rich_help_panel=DATA_PANEL)]
Classes = Annotated[Optional[str], typer.Option(
    "--classes", help="Comma-separated class names: the sub-folders (in label order) or the names of .npz labels.",
    rich_help_panel=DATA_PANEL)]


def _floats(option: str, text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated numbers, got {text!r}") from None


@dataclass(frozen=True)
class ModelChoice:
    """The model options of one command line."""

    model: Optional[str] = None
    checkpoint: Optional[Path] = None
    weights: Optional[Path] = None
    mean: Optional[str] = None
    std: Optional[str] = None
    output_index: Optional[str] = None
    logits_from_probs: bool = False

    def load(self, device: "torch.device | str") -> "tuple[nn.Module, dict[str, Any]]":
        """The model in eval mode on ``device`` and its metadata (see :func:`robustcnn.loading.load_model`)."""
        from robustcnn.checkpoint import latest_checkpoint
        from robustcnn.loading import load_model

        if self.model is not None and self.checkpoint is not None:
            raise UsageError("give --model or --checkpoint, not both")
        if self.weights is not None and self.model is None:
            raise UsageError("--weights goes with --model package.module:factory")
        spec = self.model if self.model is not None else self.checkpoint or latest_checkpoint()
        output: Any = self.output_index
        if output is not None and output.lstrip("-").isdigit():
            output = int(output)
        return load_model(spec, weights=self.weights, mean=_floats("--mean", self.mean),
                          std=_floats("--std", self.std), output=output, logits_from_probs=self.logits_from_probs,
                          device=device)


@dataclass(frozen=True)
class DataChoice:
    """The data options of one command line."""

    data: Optional[str] = None
    split: str = "test"
    image_size: Optional[int] = None
    grayscale: bool = False
    classes: Optional[str] = None
    data_dir: Optional[Path] = None

    def spec(self, meta: dict[str, Any]) -> str:
        """``--data``, else the dataset the model's metadata names; a usage error when neither says."""
        if self.data is not None:
            return self.data
        if meta.get("dataset"):
            return str(meta["dataset"])
        raise UsageError("--data is needed: the model does not record which dataset it was trained on")

    def load(self, meta: dict[str, Any], *, split: Optional[str] = None, limit: Optional[int] = None,
             require_split: bool = False) -> "ImageData":
        """The images for a model with metadata ``meta`` (``split`` overrides ``--split``, e.g. for training;
        ``require_split``: refuse a folder or file without that split instead of reading all of it)."""
        from robustcnn.userdata import load_data

        return load_data(self.spec(meta), split=split or self.split, limit=limit, image_size=self.image_size,
                         grayscale=self.grayscale, classes=self.classes, data_dir=self.data_dir,
                         require_split=require_split)

    def describe(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The data options as reports record them."""
        return {"data": self.spec(meta), "split": self.split, "image_size": self.image_size,
                "grayscale": self.grayscale, "classes": self.classes}


def load_sources(models: ModelChoice, datas: DataChoice, device: "torch.device | str", *,
                 limit: Optional[int] = None, main_first=None) -> "tuple[nn.Module, dict[str, Any], ImageData]":
    """Model, metadata and (the first ``limit``) images, checked to fit each other (one line when they do not).

    ``main_first``: the distributed context's ``main_first``, so rank 0 alone fills a data cache first."""
    from robustcnn.userdata import check_fit

    model, meta = models.load(device)
    read = lambda: datas.load(meta, limit=limit)  # noqa: E731
    data = main_first(read) if main_first is not None else read()
    check_fit(model, meta, data, device=device)
    return model, meta, data


def model_label(meta: dict[str, Any]) -> str:
    """The file or factory a model came from, for output."""
    source = meta["source"]
    return str(source.get("path") or source.get("factory"))
