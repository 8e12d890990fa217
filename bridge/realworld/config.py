"""The TOML config of ``resurgence bridge realworld train``: flat keys, typed, with teaching errors.

Every field of :class:`RunConfig` is a key; ``--set KEY=VALUE`` overrides take TOML syntax. An
unknown key is an error that suggests the closest known keys; a value of the wrong type names
the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import tomllib

from bridge.realworld.concepts import suggest
from bridge.realworld.train import TrainConfig
from bridge.realworld.world import RealWorld

__all__ = ["RunConfig", "load_flat_config", "load_run_config"]


@dataclasses.dataclass(frozen=True)
class RunConfig(TrainConfig):
    """World, UNet training and classifier settings of one training run.

    Attributes:
      concepts: concept names (empty: all 50). styles: drawing styles. size: image side (px).
      max_length: MiniLM tokens per prompt. threads: torch CPU threads.
      block_out_channels .. seed: inherited from :class:`~bridge.realworld.train.TrainConfig`
        (one list of UNet-training fields and defaults).
      classifier_steps, classifier_per_pair, classifier_width: presence/style classifier training.
    """

    concepts: tuple[str, ...] = ()
    styles: tuple[str, ...] = ("openmoji", "noto")
    size: int = 16
    max_length: int = 16
    threads: int = 1
    classifier_steps: int = 600
    classifier_per_pair: int = 32
    classifier_width: int = 32

    def world(self) -> RealWorld:
        return RealWorld(concepts=self.concepts or None, styles=self.styles, size=self.size)

    def train_config(self) -> TrainConfig:
        """The inherited training fields as a plain :class:`TrainConfig` (fingerprinted alone)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def to_dict(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def _coerce(key: str, value, hint, source: str):
    origin = typing.get_origin(hint)
    if origin is tuple:
        kind = typing.get_args(hint)[0]
        accepted = (int, float) if kind is float else kind  # TOML writes 1.0 as 1 too
        if isinstance(value, list) and all(
            isinstance(v, accepted) and not isinstance(v, bool) for v in value
        ):
            return tuple(kind(v) for v in value)
        expected = f"a list of {kind.__name__}"
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (str, bool) and type(value) is hint:
        return value
    else:
        expected = hint.__name__ if isinstance(hint, type) else str(hint)
    raise ValueError(f"`{key}` in {source} must be {expected}, got {value!r}.")


def load_flat_config(cls, path: str | Path | None = None, overrides=()):
    """An instance of the frozen dataclass ``cls`` from a TOML file of flat keys and overrides.

    Every field of ``cls`` is a key; ``overrides`` are ``KEY=VALUE`` strings in TOML syntax.

    Raises:
      ValueError: unknown key (closest keys suggested), bad TOML, wrong type, or a value that
        ``cls`` refuses (its own message).
    """
    hints = typing.get_type_hints(cls)
    values: dict = {}
    sources: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None
        values.update(data)
        sources.update({k: str(path) for k in data})
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"`--set` {item!r} must be KEY=VALUE (VALUE in TOML syntax).")
        try:
            values[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = (
                text.strip()
            )  # a bare word such as --set styles=... fails type checks below
        sources[key] = "--set"
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ValueError(
                f"unknown key `{key}` in {sources[key]}{suggest(key, list(hints))} "
                f"(known: {', '.join(hints)})."
            )
        kwargs[key] = _coerce(key, value, hints[key], sources[key])
    return cls(**kwargs)


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read a TOML file of flat keys (or the defaults), then apply ``KEY=VALUE`` overrides.

    Raises:
      ValueError: unknown key (closest keys suggested), bad TOML, wrong type, or a value the
        world or training config refuses (their own messages).
    """
    cfg = load_flat_config(RunConfig, path, overrides)
    cfg.world()  # checks concepts, styles, size and the data packages now, not after training
    return cfg
