"""Input checks of the `resurgence bridge` commands: one line on stderr, exit code 2.

Every check runs before any weights load: it reads file names, JSON configs and, for parameter
groups, a UNet built on PyTorch's ``meta`` device (names and shapes, no storage). A failure is a
:class:`UsageError`, which :func:`one_line_errors` prints the way the theory commands print
config errors (``Error: <message>`` on stderr, exit code 2, no traceback). Messages name the
argument in backticks, echo the bad value and say what would be valid.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import typer

__all__ = [
    "UsageError",
    "at_least",
    "blame",
    "caption_folder",
    "choice",
    "nonzero_displacement",
    "one_line_errors",
    "parameter_group",
    "pipeline_parts",
    "positive",
    "prompt_file",
    "quote",
    "step_list",
    "unet_folder",
    "unlearned_weights",
]

_UNET_LAYOUT = (
    "a local diffusers UNet folder (config.json + weights) or a pipeline folder with unet/"
)


def quote(value: Any) -> str:
    """``'value'`` as the user typed it (``repr`` would double a regex's backslashes)."""
    return f"'{value}'"


class UsageError(ValueError):
    """A bad command-line argument, reported as one line (whitespace is collapsed)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a typer command so that a :class:`UsageError` exits with code 2 and one line."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UsageError as err:
            typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@contextlib.contextmanager
def blame(option: str, value: Any) -> Iterator[None]:
    """Re-raise a loader's ``FileNotFoundError``/``ValueError`` as a usage error of ``option``."""
    try:
        yield
    except UsageError:
        raise
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"`{option}` {quote(value)}: {err}") from None


def choice(option: str, value: str, valid: Sequence[str]) -> str:
    """``value`` if it is one of ``valid`` (the registry the code dispatches on)."""
    if value not in valid:
        raise UsageError(f"`{option}` must be one of {', '.join(valid)}; got {quote(value)}.")
    return value


def at_least(option: str, value: float, minimum: float) -> float:
    """``value`` if it is a finite number >= ``minimum``."""
    if not minimum <= value < float("inf"):  # also refuses NaN
        raise UsageError(f"`{option}` must be a finite number >= {minimum:g}; got {value!r}.")
    return value


def positive(option: str, value: float) -> float:
    """``value`` if it is a finite number > 0."""
    if not 0 < value < float("inf"):  # also refuses NaN
        raise UsageError(f"`{option}` must be a finite number > 0; got {value!r}.")
    return value


def step_list(option: str, text: str) -> list[int]:
    """Parse ``"1,10,100"`` into distinct step counts >= 0, in the order given."""
    expected = "distinct integers >= 0 separated by commas, e.g. '1,10,100,1000'"
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"`{option}` must be {expected}; got {quote(text)}.") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise UsageError(f"`{option}` must be {expected}; got {quote(text)}.")
    return values


def unet_folder(option: str, path: Path) -> Path:
    """The UNet folder (``path`` or ``path/unet``) that :func:`bridge.loading.load_unet` reads."""
    from bridge.loading import _unet_folder  # the loader's own rule, so the two cannot drift

    if not Path(path).exists():
        raise UsageError(f"`{option}` {quote(path)} does not exist; give {_UNET_LAYOUT}.")
    with blame(option, path):
        return _unet_folder(Path(path))


def unlearned_weights(option: str, path: Path) -> Path:
    """An unlearned UNet folder or a state-dict file of a suffix the loader reads."""
    from bridge.loading import _STATE_DICT_SUFFIXES

    path = Path(path)
    if path.is_dir():
        return unet_folder(option, path)
    if not path.is_file():
        raise UsageError(
            f"`{option}` {quote(path)} does not exist; give the unlearned UNet or pipeline "
            f"folder, or a state-dict file ({', '.join(_STATE_DICT_SUFFIXES)})."
        )
    if path.suffix not in _STATE_DICT_SUFFIXES:
        raise UsageError(
            f"`{option}` {quote(path)} has suffix {quote(path.suffix)}; a state-dict file must "
            f"end in one of {', '.join(_STATE_DICT_SUFFIXES)}."
        )
    return path


def pipeline_parts(option: str, folder: Path, parts: dict[str, str | None]) -> None:
    """Check that ``folder`` holds each sub-folder of ``parts`` (``{sub: file in it or None}``)."""
    for sub, needed in parts.items():
        where = Path(folder) / sub
        present = (where / needed).is_file() if needed else where.is_dir()
        if not present:
            missing = f"{sub}/{needed}" if needed else f"{sub}/"
            raise UsageError(
                f"`{option}` {quote(folder)} has no {missing}; this command needs a pipeline "
                f"folder with unet/, {', '.join(f'{s}/' for s in parts)}."
            )


def prompt_file(option: str, path: Path) -> list[str]:
    """The non-blank lines of a prompt file."""
    if not Path(path).is_file():
        raise UsageError(
            f"`{option}` {quote(path)} is not a file; give a text file with one prompt per line."
        )
    prompts = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise UsageError(f"`{option}` {quote(path)} has no prompts; write one prompt per line.")
    return prompts


def caption_folder(option: str, folder: Path) -> int:
    """Number of captioned images in ``folder`` (names and captions checked, no decoding)."""
    from bridge.data import check_caption_folder

    with blame(option, folder):
        return len(check_caption_folder(folder))


def parameter_group(option: str, spec: str, folder: Path, *, extra: Sequence[str] = ()):
    """The parameter group ``spec`` of the UNet in ``folder``, resolved on the meta device.

    Args:
      option: the argument's name. spec: a :data:`bridge.groups.PRESETS` name or a regex.
      folder: a UNet folder from :func:`unet_folder`. extra: other accepted words (``lora``).

    Returns:
      :class:`bridge.groups.ParameterGroup` (names and shapes), or None for a word of ``extra``.
    """
    if spec in extra:
        return None
    import torch
    from diffusers import UNet2DConditionModel

    from bridge.groups import PRESETS, select_group

    valid = ", ".join([*PRESETS, *extra])
    try:
        re.compile(PRESETS.get(spec, spec))
    except re.error as err:
        raise UsageError(
            f"`{option}` {quote(spec)} is not a preset ({valid}) nor a valid regular expression "
            f"({err})."
        ) from None
    with torch.device("meta"):  # names and shapes only: no weights are read or allocated
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder)))
    try:
        return select_group(unet, spec)
    except ValueError:
        example = next(name for name, _ in unet.named_parameters())
        raise UsageError(
            f"`{option}` {quote(spec)} matches no parameter of the UNet in {folder}; give a preset "
            f"({valid}) or a regular expression over parameter names such as {quote(example)}."
        ) from None


def nonzero_displacement(option: str, path: Path, base, unlearned, spec: str) -> None:
    """Refuse theta_u = theta_0 over group ``spec`` (needs both UNets loaded)."""
    from bridge.groups import select_group

    group = select_group(base, spec)  # resolved by `parameter_group` before the weights loaded
    if all(_equal(base.get_parameter(n), unlearned.get_parameter(n)) for n in group.names):
        raise UsageError(
            f"`{option}` {quote(path)} equals the base UNet on parameter group {quote(spec)} "
            f"({group.numel} parameters): delta = theta_u - theta_0 is zero, so there is no "
            "resurgence to measure; pass weights unlearned from `--base` that edit this group."
        )


def _equal(a, b) -> bool:
    """Exact equality of two parameters (``b`` moved to ``a``'s device and dtype)."""
    import torch

    return torch.equal(a.detach(), b.detach().to(a.device, a.dtype))


def testbed_classifier(path: Path | None, concept: int | None):
    """``--classifier`` / ``--presence-class``: differentiable log-probabilities of a saved testbed
    :class:`bridge.testbed.classifier.ConceptClassifier`, or None when neither is given."""
    if (path is None) != (concept is None):
        raise UsageError("give `--classifier` and `--presence-class` together (presence).")
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"`--classifier` {quote(path)} is not a file.")
    at_least("--presence-class", concept, 0)
    import torch

    from bridge.testbed.classifier import ConceptClassifier
    from bridge.testbed.predict import classifier_log_probs

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = ConceptClassifier.from_state_dict(state)
    except Exception as err:  # pickle/zip errors, a state dict of another model, ...
        raise UsageError(
            f"`--classifier` {quote(path)} is not a testbed concept classifier state dict "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
        ) from None
    classes = model.net[-1].out_features
    if concept >= classes:
        raise UsageError(
            f"`--presence-class` {concept} is out of range: {quote(path)} has {classes} classes."
        )
    return classifier_log_probs(model.eval())
