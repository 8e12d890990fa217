"""Checkpoint formats other tools publish: CompVis / LDM UNet keys and Lightning ``.ckpt`` pickles.

:func:`checkpoint_layout` tells the LDM layout (``model.diffusion_model.input_blocks...``, as ESD,
SalUn, Scissorhands and EraseDiff release their weights) from diffusers names;
:func:`convert_ldm_unet` converts it with diffusers' own ``convert_ldm_unet_checkpoint`` against
the base UNet's config (nothing is downloaded). :func:`torch_load` reads a pickle with
``torch.load(weights_only=True)``: the training metadata Lightning pickles (callbacks, OmegaConf
configs, NumPy scalars) is an allow-list of names replaced by inert stand-ins, and any other
pickled object is refused with a message naming it. :mod:`bridge.loading` uses all three.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

__all__ = ["LIGHTNING_METADATA", "checkpoint_layout", "convert_ldm_unet", "torch_load"]

#: Prefixes under which LDM checkpoints keep the UNet (LatentDiffusion.model.diffusion_model).
_LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_LDM_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.")

#: Globals that Lightning / LDM checkpoints pickle as training metadata, never as weights. Loading
#: replaces each by an inert stand-in (nothing of theirs is imported or run); a module prefix
#: (ending in ``.``) allows every name under it.
LIGHTNING_METADATA: tuple[str, ...] = (
    "pytorch_lightning.callbacks.",
    "lightning.pytorch.callbacks.",
    "lightning_fabric.",
    "omegaconf.",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.",
    "_codecs.encode",
    "typing.Any",
    "collections.defaultdict",
    "builtins.set",
)


class _Inert:
    """Stand-in for an allow-listed metadata object: accepts any arguments and state, keeps none."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _allowed(name: str) -> bool:
    return any(name == a or (a.endswith(".") and name.startswith(a)) for a in LIGHTNING_METADATA)


def torch_load(path: Path):
    """``torch.load(weights_only=True)``; allow-listed metadata globals become :class:`_Inert`."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    refused = [name for name in unsafe if not _allowed(name)]
    if refused:
        raise ValueError(
            f"{path} pickles Python objects that torch.load(weights_only=True) will not build "
            f"({', '.join(refused)}): unpickling them could run arbitrary code. If the file is "
            "trusted, re-save its state dict as a plain dict of tensors (torch.save) or as "
            ".safetensors and pass that file"
        )
    stand_ins = [(_Inert, name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True) even with its metadata "
            f"({', '.join(unsafe)}) stubbed out: {' '.join(str(err).split())[:200]}"
        ) from None


def checkpoint_layout(keys) -> str:
    """``"ldm"`` for CompVis / LDM UNet keys (``model.diffusion_model.*`` or bare ``input_blocks.*``),
    else ``"diffusers"``.

    >>> checkpoint_layout(["model.diffusion_model.input_blocks.0.0.weight"])
    'ldm'
    """
    keys = list(keys)
    if any(k.startswith(_LDM_PREFIXES) for k in keys):
        return "ldm"
    if keys and sum(k.startswith(_LDM_BLOCKS) for k in keys) > len(keys) // 2:
        return "ldm"
    return "diffusers"


def convert_ldm_unet(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Convert a CompVis / LDM UNet state dict to diffusers names with diffusers' own converter.

    Args:
      state_dict: the checkpoint's tensors (whole LatentDiffusion or the UNet alone; VAE, text
        encoder and EMA tensors are ignored, the non-EMA UNet is kept).
      config: the diffusers ``UNet2DConditionModel`` config (dict or FrozenDict) of the base,
        e.g. ``unet.config`` or the base folder's ``unet/config.json``.

    Returns:
      The UNet's tensors under diffusers names.

    Raises:
      ValueError: when ``config`` is None (the LDM layout does not say the block structure).
    """
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    if config is None:
        raise ValueError(
            "this is a CompVis/LDM checkpoint (model.diffusion_model.* keys); converting it needs "
            "the base pipeline's unet/config.json, so pass the base UNet or its folder"
        )
    full = {}
    for key, tensor in state_dict.items():
        for prefix in _LDM_PREFIXES:
            if key.startswith(prefix):
                full[LDM_UNET_KEY + key[len(prefix) :]] = tensor
                break
        else:
            if key.startswith(_LDM_BLOCKS + ("out.",)):
                full[LDM_UNET_KEY + key] = tensor
    # diffusers numbers the blocks by counting those present: give a partial checkpoint (only
    # the edited blocks, as UCE/MACE-style releases) an empty placeholder for every absent index
    for block in ("input_blocks", "middle_block", "output_blocks"):
        found = {
            int(k[len(LDM_UNET_KEY) :].split(".")[1])
            for k in full
            if k[len(LDM_UNET_KEY) :].startswith(block + ".")
        }
        for i in set(range(max(found, default=-1) + 1)) - found:
            full[f"{LDM_UNET_KEY}{block}.{i}.absent"] = torch.empty(0)
    converted = convert_ldm_unet_checkpoint(full, dict(config))
    return {k: v for k, v in converted.items() if v is not None and not k.endswith(".absent")}
