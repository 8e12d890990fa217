"""Load base and unlearned UNets from local diffusers folders or released state dicts.

Local-first (style.md s.12): every path is a local directory or file, ``local_files_only=True``,
and each error names the path and the missing file. Unlearning methods release their edits in
three forms, all accepted by :func:`load_unlearned_unet`:

* a full diffusers UNet folder (or a pipeline folder with ``unet/``),
* a full state dict (``.safetensors`` / ``.pt`` / ``.bin``, e.g. ESD's checkpoints),
* a partial state dict holding only the edited tensors (UCE / MACE cross-attention edits),
  applied on a copy of the base.

The key layout is detected from the keys: diffusers names (``down_blocks.0...``), optionally
behind a ``unet.``/``module.``/``model.`` prefix, or the original CompVis / LDM layout
(``model.diffusion_model.input_blocks...``, as ESD, SalUn, Scissorhands and EraseDiff release
their weights), converted with diffusers' own single-file conversion
(``convert_ldm_unet_checkpoint``) against the base UNet's config, so nothing is downloaded.
Lightning ``.ckpt`` files are read with ``torch.load(weights_only=True)``: the training metadata
they pickle (callbacks, OmegaConf configs, NumPy scalars) is an allow-list of names replaced by
inert stand-ins; any other pickled object is refused with a message naming it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from bridge.checkpoints import (
    LIGHTNING_METADATA,
    checkpoint_layout,
    convert_ldm_unet,
    torch_load,
)

__all__ = [
    "LIGHTNING_METADATA",
    "apply_state_dict",
    "checkpoint_layout",
    "convert_ldm_unet",
    "load_state_dict_file",
    "load_unet",
    "load_unet_weights",
    "load_unlearned_unet",
]

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
)
_STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _unet_folder(path: Path) -> Path:
    """Resolve a UNet folder or a pipeline folder with ``unet/``; errors name what is missing."""
    if not path.exists():
        raise FileNotFoundError(f"UNet path does not exist: {path}")
    if not path.is_dir():
        raise ValueError(f"expected a diffusers UNet folder, got a file: {path}")
    if (path / "unet").is_dir() and not (path / "config.json").is_file():
        path = path / "unet"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers UNet folder: missing config.json "
            "(give a UNet folder or a pipeline folder with unet/)"
        )
    cls = json.loads((path / "config.json").read_text()).get("_class_name")
    if cls != "UNet2DConditionModel":
        raise ValueError(f"{path / 'config.json'} describes {cls!r}, not a UNet2DConditionModel")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"missing UNet weights in {path}: expected one of {', '.join(_WEIGHT_FILES)}"
        )
    return path


def load_unet(path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a ``UNet2DConditionModel`` from a local folder, in eval mode, without downloads.

    Args:
      path: UNet folder (``config.json`` + weights) or pipeline folder with ``unet/``.
      device: torch device. dtype: torch dtype (None keeps the stored one; float64 for tests).

    Returns:
      The UNet in eval mode.

    Raises:
      FileNotFoundError: if the path, its ``config.json`` or weight file is missing (named).
      ValueError: if the path is a file, or the config is not a ``UNet2DConditionModel``.
    """
    from diffusers import UNet2DConditionModel

    folder = _unet_folder(Path(path))
    only_fp16 = not any((folder / f).is_file() for f in _WEIGHT_FILES[:2])
    unet = UNet2DConditionModel.from_pretrained(
        str(folder), local_files_only=True, variant="fp16" if only_fp16 else None
    )
    return unet.to(device=device, dtype=dtype).eval()


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read a state dict: ``.safetensors`` or a torch pickle (``.pt``/``.pth``/``.bin``/``.ckpt``).

    Nested checkpoints of the form ``{"state_dict": {...}}`` or ``{"unet": {...}}`` are unwrapped.

    Args:
      path: file path.

    Returns:
      Mapping tensor name -> tensor.

    Raises:
      FileNotFoundError: if the file is missing. ValueError: for an unknown suffix or content.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state dict file does not exist: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in _STATE_DICT_SUFFIXES:
        raise ValueError(
            f"unknown state dict format {path.suffix!r} for {path}; "
            f"expected one of {', '.join(_STATE_DICT_SUFFIXES)}"
        )
    sd = torch_load(path)
    for key in ("state_dict", "unet", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat mapping name -> tensor")
    return sd


def _strip_prefix(sd: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """Drop a common ``unet.``/``module.``/``model.`` prefix if keys only match without it."""
    if not sd or any(k in names for k in sd):
        return sd
    for prefix in ("unet.", "module.", "model."):
        if all(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def apply_state_dict(unet, state_dict: dict[str, torch.Tensor], *, partial: bool = True):
    """Return a copy of ``unet`` with the tensors of ``state_dict`` written in.

    Args:
      unet: base ``UNet2DConditionModel`` (not modified).
      state_dict: name -> tensor (diffusers or LDM layout); with ``partial`` only these change.
      partial: if False, every parameter of ``unet`` must be present.

    Returns:
      The edited copy (same device/dtype as ``unet``, eval mode).

    Raises:
      ValueError: naming the first tensor whose name is unknown or whose shape differs, or the
        first missing tensor when ``partial=False``.
    """
    own = dict(unet.state_dict())
    if checkpoint_layout(state_dict) == "ldm":
        state_dict = convert_ldm_unet(dict(state_dict), unet.config)
    state_dict = _strip_prefix(dict(state_dict), set(own))
    for name, tensor in state_dict.items():
        if name not in own:
            raise ValueError(
                f"architecture mismatch: tensor {name!r} of the unlearned weights does not exist "
                f"in the base UNet (e.g. base has {next(iter(own))!r})"
            )
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"architecture mismatch: tensor {name!r} has shape {tuple(tensor.shape)} in the "
                f"unlearned weights but {tuple(own[name].shape)} in the base UNet"
            )
    if not partial:
        missing = [n for n in own if n not in state_dict]
        if missing:
            raise ValueError(
                f"full state dict is missing tensor {missing[0]!r} (and {len(missing) - 1} more)"
            )
    edited = copy.deepcopy(unet)
    ref = next(iter(own.values()))
    with torch.no_grad():
        for name, tensor in state_dict.items():
            target = _lookup(edited, name)
            target.copy_(tensor.to(device=ref.device, dtype=target.dtype))
    return edited.eval()


def load_unet_weights(
    path, *, config=None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """A ``UNet2DConditionModel`` from one full state-dict file (diffusers or CompVis/LDM layout).

    Args:
      path: ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.bin`` with every UNet tensor (an LDM file
        may hold the whole LatentDiffusion; only its UNet is read).
      config: the UNet config: a dict, a UNet folder or a pipeline folder with ``unet/``
        (e.g. the base model's); required, since a single file does not say its block structure.
      device, dtype: placement of the result.

    Returns:
      The UNet in eval mode.

    Raises:
      FileNotFoundError: a missing file or config folder.
      ValueError: no ``config`` (naming the layout found), or a tensor whose name or shape differs
        from the config's UNet (the first one named).
    """
    from diffusers import UNet2DConditionModel

    state = load_state_dict_file(path)
    layout = checkpoint_layout(state)
    if config is None:
        raise ValueError(
            f"{path} is a single {'CompVis/LDM' if layout == 'ldm' else 'diffusers'} weights file "
            "without a UNet config; give the base pipeline folder whose unet/config.json "
            "describes it"
        )
    if isinstance(config, (str, Path)):
        config = UNet2DConditionModel.load_config(str(_unet_folder_config(Path(config))))
    with torch.device("meta"):  # names and shapes only; the file's tensors are assigned below
        unet = UNet2DConditionModel.from_config(config)
    own = unet.state_dict()
    if layout == "ldm":
        state = convert_ldm_unet(state, unet.config)
    state = _strip_prefix(dict(state), set(own))
    for name, tensor in state.items():
        if name not in own or tuple(tensor.shape) != tuple(own[name].shape):
            where = (
                "does not exist"
                if name not in own
                else (
                    f"has shape {tuple(tensor.shape)} there but {tuple(own[name].shape)} in the config"
                )
            )
            raise ValueError(f"architecture mismatch with {path}: tensor {name!r} {where}")
    missing = [n for n in own if n not in state]
    if missing:
        raise ValueError(
            f"architecture mismatch with {path}: tensor {missing[0]!r} of the config's UNet is "
            f"missing from the file (and {len(missing) - 1} more)"
        )
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.to(device=device, dtype=dtype).eval()


def _unet_folder_config(path: Path) -> Path:
    """The folder holding ``config.json`` of a UNet (``path`` or ``path/unet``)."""
    if (path / "unet" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "unet"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"missing UNet config: no config.json in {path} (or {path}/unet)")
    return path


def _lookup(module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


def _check_same_architecture(base, other, where: Path) -> None:
    a, b = base.state_dict(), other.state_dict()
    for name in list(a) + [n for n in b if n not in a]:
        if name not in b or name not in a:
            side = "unlearned" if name not in b else "base"
            raise ValueError(
                f"architecture mismatch with {where}: tensor {name!r} is missing from the "
                f"{side} UNet"
            )
        if a[name].shape != b[name].shape:
            raise ValueError(
                f"architecture mismatch with {where}: tensor {name!r} has shape "
                f"{tuple(b[name].shape)} there but {tuple(a[name].shape)} in the base UNet"
            )


def load_unlearned_unet(
    base, unlearned, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """Load an unlearned UNet given as a folder or a (full or partial) state dict file.

    Args:
      base: the base ``UNet2DConditionModel`` (already loaded; not modified).
      unlearned: path to a diffusers UNet/pipeline folder or a state dict file.
      device, dtype: placement of the result (default: base's device, ``dtype`` or base's dtype).

    Returns:
      The unlearned UNet in eval mode, same architecture as ``base``.

    Raises:
      FileNotFoundError: if the path or required files are missing (named).
      ValueError: on an architecture/shape mismatch, naming the first tensor that differs.
    """
    path = Path(unlearned)
    if not path.exists():
        raise FileNotFoundError(f"unlearned weights path does not exist: {path}")
    ref = next(base.parameters())
    dtype = dtype or ref.dtype
    if path.is_dir():
        unet = load_unet(path, device=device, dtype=dtype)
        _check_same_architecture(base, unet, path)
        return unet
    edited = apply_state_dict(base, load_state_dict_file(path), partial=True)
    return edited.to(device=device, dtype=dtype).eval()
