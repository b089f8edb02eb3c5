"""Models from anywhere: robustcnn checkpoints, TorchScript files, ``torch.export`` programs, or a Python factory.

:func:`load_model` returns a model that maps images in [0, 1] pixel units (N, C, H, W) to logits (N, K), so every
attack budget stays in pixel units whatever the model expects, plus a metadata dict the commands use::

    {"input_shape": (C, H, W) or None, "classes": [...] or None, "num_classes": K or None, "dataset": name or None,
     "sha256": identity of the model and its wrapper, "source": {"kind", "path" | "factory", "weights", "wrapper"}}

A robustcnn checkpoint's metadata keeps every key it has today and gains ``source`` and ``sha256`` (the file's
hash, so report folders and resume states are the same as before). The format of a file is read from its content:
a zip written by ``torch.jit.save`` (``code/`` and ``constants.pkl``), by ``torch.export.save`` (``archive_format``
or ``models/model.json``) or by ``torch.save`` (a robustcnn checkpoint dict). Python code is imported only when the
user names it as ``package.module:factory``; weights are read with ``torch.load(weights_only=True)``, which refuses
to run pickled code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from robustcnn.errors import CheckpointError, RobustCNNError, UsageError
from robustcnn.models import Normalize

#: ``package.module:factory``: a dotted module path, a colon, a name.
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
#: Probabilities are clamped to this before the log, so a zero probability gives a finite logit.
PROB_FLOOR = 1e-12

Output = Union[int, str, None]


class ModelLoadError(RobustCNNError, ValueError):
    """A model file or factory cannot be used: unreadable, of no known format, or not a classifier (exit 1)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


class PixelModel(nn.Module):
    """The user's model seen as ``pixels in [0, 1] -> logits``.

    ``mean``/``std`` normalize per channel before the model; ``output`` picks one entry of a tuple/list (an int) or
    a dict (a key) the model returns; ``logits_from_probs`` takes ``log(clamp(p, PROB_FLOOR))`` of a model that
    returns probabilities (the same argmax and a cross-entropy that attacks can climb). ``frozen`` marks a
    ``torch.export`` program, whose train/eval behaviour was fixed when it was exported: ``train()``/``eval()``
    then set only this wrapper's flag.
    """

    def __init__(self, model: nn.Module, *, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, output: Output = None, logits_from_probs: bool = False,
                 frozen: bool = False) -> None:
        super().__init__()
        self.model = model
        self.normalize = Normalize(mean, std) if mean is not None else None
        self.output = output
        self.logits_from_probs = logits_from_probs
        self.frozen = frozen

    def train(self, mode: bool = True) -> "PixelModel":  # noqa: D102
        if not self.frozen:
            return super().train(mode)
        self.training = mode
        if self.normalize is not None:
            self.normalize.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = self.model(self.normalize(x) if self.normalize is not None else x)
        if self.output is not None:
            out = _select(out, self.output)
        if not isinstance(out, Tensor):
            raise ModelLoadError(f"the model returns {_describe(out)}, not a logits tensor: choose one output with "
                                 "output=INDEX or KEY (--output-index)")
        return out.clamp_min(PROB_FLOOR).log() if self.logits_from_probs else out

    def describe(self) -> dict[str, Any]:
        """What this wrapper does, for reports: normalization, output selection, probability conversion."""
        norm = None if self.normalize is None else {"mean": self.normalize.mean.flatten().tolist(),
                                                   "std": self.normalize.std.flatten().tolist()}
        return {"normalize": norm, "output": self.output, "logits_from_probs": self.logits_from_probs}


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _select(out: Any, output: int | str) -> Any:
    if isinstance(out, dict):
        if output not in out:
            raise ModelLoadError(f"output {output!r} is not among the model's outputs {sorted(map(str, out))}")
        return out[output]
    if isinstance(out, (tuple, list)):
        if not isinstance(output, int) or not -len(out) <= output < len(out):
            raise ModelLoadError(f"output {output!r} does not index the model's {len(out)} outputs")
        return out[output]
    raise ModelLoadError(f"output={output!r} was given but the model returns {_describe(out)}")


def detect_format(spec: str | Path) -> str:
    """``"factory"``, ``"torchscript"``, ``"export"`` or ``"torch-save"`` (read from the file's content)."""
    text = str(spec)
    path = Path(text).expanduser()
    if not path.exists() and FACTORY.match(text):
        return "factory"
    if not path.exists():
        hint = " (or name a factory as package.module:function)" if ":" in text else ""
        raise ModelLoadError(f"model file not found: {text}{hint}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a model file")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is neither a TorchScript file, a torch.export program (.pt2) nor a robustcnn "
                             "checkpoint (not a PyTorch zip archive)")
    try:
        names = zipfile.ZipFile(path).namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{path} is a damaged zip archive ({_first_line(exc)})") from None
    inner = {name.split("/", 1)[1] for name in names if "/" in name}
    if "archive_format" in inner or "models/model.json" in inner:
        return "export"
    if "constants.pkl" in inner and any(name.startswith("code/") for name in inner):
        return "torchscript"
    if "data.pkl" in inner:
        return "torch-save"
    raise ModelLoadError(f"{path} is a zip archive but neither a TorchScript file, a torch.export program (.pt2) "
                         "nor a robustcnn checkpoint")


def load_model(spec: str | Path, *, weights: str | Path | None = None, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, output: Output = None, logits_from_probs: bool = False,
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load the classifier ``spec`` names onto ``device`` in eval mode; return it with its metadata.

    ``spec``: a robustcnn checkpoint, a TorchScript file, a ``torch.export`` program (``.pt2``, exported with a
    dynamic batch dimension), or ``package.module:factory`` (a function returning an ``nn.Module``; ``weights``: a
    state-dict file for it). ``mean``/``std``: the per-channel normalization the model expects, applied inside
    the returned model. ``output``: the index or key of the logits when the model returns a tuple or dict.
    ``logits_from_probs``: the model returns probabilities; use their log. Problems with the files or the code
    raise :class:`ModelLoadError`; invalid option values :class:`~robustcnn.errors.UsageError`.
    """
    if (mean is None) != (std is None):
        raise UsageError("mean and std go together: give both or neither")
    if mean is not None and (len(mean) != len(std) or not all(s > 0 for s in std)):  # type: ignore[arg-type]
        raise UsageError(f"mean/std need one value per channel and a positive std, got {list(mean)} / {list(std)}")
    kind = detect_format(spec)
    if weights is not None and kind != "factory":
        raise UsageError("weights apply to a package.module:factory model; a model file carries its own weights")
    wrapped = mean is not None or output is not None or logits_from_probs
    if kind == "torch-save":
        if wrapped:
            raise UsageError(f"{spec} is a robustcnn checkpoint: it normalizes its inputs and returns logits itself, "
                             "so mean/std, output and logits_from_probs do not apply")
        return _robustcnn(Path(spec), device)

    meta: dict[str, Any] = {"input_shape": None, "classes": None, "num_classes": None, "dataset": None}
    source: dict[str, Any] = {"kind": kind}
    if kind == "factory":
        model = _from_factory(str(spec), weights)
        source.update(factory=str(spec), weights=None if weights is None else str(weights),
                      weights_sha256=None if weights is None else _sha256(Path(weights)))
    elif kind == "torchscript":
        model = _torchscript(Path(spec))
        source.update(path=str(spec), sha256=_sha256(Path(spec)))
    else:
        model, meta["input_shape"] = _exported(Path(spec))
        source.update(path=str(spec), sha256=_sha256(Path(spec)))
    wrapper = PixelModel(model, mean=mean, std=std, output=output, logits_from_probs=logits_from_probs,
                         frozen=kind == "export")
    wrapper = wrapper.to(device).eval()
    source["wrapper"] = wrapper.describe()
    meta["source"] = source
    meta["sha256"] = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
    if meta["input_shape"] is not None:
        meta["num_classes"] = probe(wrapper, torch.zeros(1, *meta["input_shape"]), device=device)
    return wrapper, meta


def _sha256(path: Path) -> str:
    from robustcnn.report import file_sha256

    return file_sha256(path)


def _robustcnn(path: Path, device: str | torch.device) -> tuple[nn.Module, dict[str, Any]]:
    from robustcnn import checkpoint

    try:
        model, meta = checkpoint.load_model(path, device=device)
    except CheckpointError as exc:
        if not str(exc).endswith("is not a robustcnn checkpoint"):
            raise
        raise ModelLoadError(f"{path} holds a torch.save'd object, not a robustcnn checkpoint: for a state dict, name "
                             "its model as package.module:factory and pass the file as weights (--weights)") from None
    digest = _sha256(path)
    meta = {**meta, "num_classes": len(meta["classes"]), "sha256": digest,
            "source": {"kind": "robustcnn", "path": str(path), "sha256": digest, "wrapper": None}}
    return model, meta


def _torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch.jit.load announces its own deprecation on every call
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # the TorchScript loader raises RuntimeError subclasses of many kinds
        raise ModelLoadError(f"{path}: cannot load the TorchScript file ({_first_line(exc)})") from None


def _exported(path: Path) -> tuple[nn.Module, Optional[tuple[int, ...]]]:
    """The module of a ``torch.export`` program and the (C, H, W) of its one image input (None if not fixed)."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # deserialization raises many kinds of errors on damaged or foreign archives
        raise ModelLoadError(f"{path}: cannot load the torch.export program ({_first_line(exc)})") from None
    inputs = [node.meta.get("val") for node in program.graph.nodes
              if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
    if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or inputs[0].dim() != 4:
        raise ModelLoadError(f"{path}: the exported program must take one image batch (N, C, H, W), it takes "
                             f"{len(inputs)} inputs")
    batch, *rest = inputs[0].shape
    if isinstance(batch, int):
        raise ModelLoadError(f"{path} was exported for batches of exactly {batch}: export it with a dynamic batch "
                             "size, dynamic_shapes=({0: torch.export.Dim('batch')},)")
    shape = tuple(rest) if all(isinstance(d, int) for d in rest) else None
    return program.module(), shape


def _from_factory(spec: str, weights: str | Path | None) -> nn.Module:
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs the user's code: any exception means "cannot import"
        raise ModelLoadError(f"cannot import {module_name!r} for {spec} ({type(exc).__name__}: "
                             f"{_first_line(exc)})") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ModelLoadError(f"{module_name} has no function {func_name!r} (from {spec})")
    try:
        model = factory()
    except Exception as exc:  # the user's factory may fail in any way
        raise ModelLoadError(f"{spec}() failed ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec}() returned {_describe(model)}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(model, Path(weights), spec)
    return model


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    """Load a state dict from ``path`` into ``model``; every mismatch is named in one line."""
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code with UnpicklingError; other failures: damage
        raise ModelLoadError(f"{path} is not a plain state dict (refused to unpickle it: "
                             f"{_first_line(exc).split('. ')[0]})") from None
    if isinstance(state, dict) and set(state) & {"state_dict", "model"} and len(state) <= 3:
        state = state.get("state_dict", state.get("model"))  # the common {"state_dict": ...} wrappers
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a state dict (a dict of tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(extra)}"] if extra else []) \
        + ([f"wrong shape {_few(shapes)}"] if shapes else [])
    if problems:
        raise ModelLoadError(f"{path} does not fit {spec}(): {'; '.join(problems)}")
    model.load_state_dict(state)


def _few(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def probe(model: nn.Module, x: Tensor, *, device: str | torch.device = "cpu") -> int:
    """Run ``model`` on the images ``x`` (floats in [0, 1]) and return its number of outputs K.

    :class:`ModelLoadError` in one line if it fails on them, or its output is not logits of shape (N, K):
    a tuple or dict (choose one with ``output``), another shape, or probabilities (``logits_from_probs``).
    """
    norm = model.normalize if isinstance(model, PixelModel) else None
    if norm is not None and norm.mean.numel() != x.shape[1]:
        raise ModelLoadError(f"mean/std give {norm.mean.numel()} channels but the images have {x.shape[1]}")
    try:
        with torch.no_grad():
            out = model(x.to(device))
    except ModelLoadError:
        raise
    except Exception as exc:  # the user's model may fail in any way on inputs it does not accept
        raise ModelLoadError(f"the model fails on images of shape {tuple(x.shape[1:])} "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ModelLoadError(f"the model returns shape {tuple(out.shape)} for {x.shape[0]} images, not logits "
                             "(N, classes)")
    if not torch.isfinite(out).all():
        raise ModelLoadError("the model returns NaN or infinite values")
    sums = out.sum(1)
    if not getattr(model, "logits_from_probs", False) and (out >= 0).all() and torch.allclose(
            sums, torch.ones_like(sums), atol=1e-4):
        raise ModelLoadError("the model returns probabilities (each row is >= 0 and sums to 1), not logits: "
                             "pass logits_from_probs=True (--logits-from-probs) to attack their log")
    return int(out.shape[1])
