"""Sweep configs: a TOML schema with types and ranges, exact round-trips, and teaching errors.

A config names fixed parameters (``[params]``) and swept axes (``[axes]``)::

    name = "theory_phase"
    chunk_size = 256
    steps = [0, 100]              # fine-tuning step counts recorded
    truncation_ranks = [1, 4]     # k of the truncated closure rho_k

    [params]
    lr = 0.2

    [axes]
    overlap_angle = {linspace = [0.0, 1.5707963267948966, 13]}
    curvature = {logspace = [-2.0, 1.0, 13]}     # base-10 exponents
    seed = {range = [0, 300]}
    method = ["uce"]

Every parameter of :data:`PARAMS` may be fixed or swept; defaults fill the rest. Saving writes
sorted keys and normalised values (floats as floats), so save -> load -> save is byte-identical.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from theory._atomic import atomic_write_text

__all__ = [
    "ParamSpec",
    "PARAMS",
    "SweepConfig",
    "load_config",
    "loads_config",
    "apply_overrides",
    "ConfigError",
]

_PI_2 = math.pi / 2


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (the message says how to fix it)."""


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Type, allowed range and meaning of one parameter.

    ``static`` parameters change array shapes (an outer loop over groups); ``indexed`` ones are code
    choices (one compiled variant per value, dispatched at trace time, so a configuration runs
    only its own); the rest are traced scalars.
    """

    kind: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    static: bool = False
    indexed: bool = False

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"in {lo}{self.low}, {self.high}{hi}"


def _method_names() -> tuple[str, ...]:
    from theory.unlearning import METHOD_NAMES

    return METHOD_NAMES


def _build_params() -> dict[str, ParamSpec]:
    from theory.sweep import DYNAMIC_KNOBS, FINETUNE_MODES, OPTIMIZERS

    dyn = DYNAMIC_KNOBS
    return {
        "dim": ParamSpec(int, 16, "image dimension d", 1, 4096, static=True),
        "embed_dim": ParamSpec(
            int, 8, "embedding dimension m (>= num_concepts + 1)", 2, 4096, static=True
        ),
        "num_concepts": ParamSpec(int, 5, "number of concepts K", 1, 1024, static=True),
        "num_levels": ParamSpec(int, 10, "noise levels L", 1, 1000, static=True),
        "num_erased": ParamSpec(
            int, 1, "concepts erased at once (the first ones)", 1, 1024, indexed=True
        ),
        "method": ParamSpec(str, "uce", "unlearning method", choices=_method_names(), indexed=True),
        "optimizer": ParamSpec(
            str, "gd_closed_form", "fine-tuning optimizer", choices=OPTIMIZERS, indexed=True
        ),
        "finetune": ParamSpec(
            str, "constructed", "fine-tuning prompt set", choices=FINETUNE_MODES, static=True
        ),
        "seed": ParamSpec(int, dyn["seed"], "PRNG seed of the random problem", 0, 2**31 - 1),
        "common_component": ParamSpec(
            float,
            dyn["common_component"],
            "rho_c, pairwise cosine of concept embeddings",
            0,
            1,
            high_open=True,
        ),
        "spectrum_decay": ParamSpec(
            float, dyn["spectrum_decay"], "power-law exponent of Sigma's spectrum", 0, 10
        ),
        "generator_scale": ParamSpec(
            float, dyn["generator_scale"], "scale of A", 0, 100, low_open=True
        ),
        "overlap_angle": ParamSpec(
            float,
            dyn["overlap_angle"],
            "angle (rad) between r and the fine-tuning prompt",
            0,
            _PI_2,
        ),
        "curvature": ParamSpec(
            float, dyn["curvature"], "squared norm of fine-tuning prompts", 0, 1e6, low_open=True
        ),
        "p_null": ParamSpec(
            float, dyn["p_null"], "null-prompt dropout in fine-tuning", 0, 1, high_open=True
        ),
        "target_shift": ParamSpec(
            float, dyn["target_shift"], "new-concept shift of fine-tuning images", 0, 100
        ),
        "lr": ParamSpec(float, dyn["lr"], "fine-tuning step size", 0, 100, low_open=True),
    }


PARAMS: dict[str, ParamSpec] = _build_params()
_TOP_LEVEL = ("axes", "chunk_size", "description", "name", "params", "steps", "truncation_ranks")
_AXIS_FORMS = ("linspace", "logspace", "range")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A validated, normalised sweep config.

    Attributes:
      name: run name (non-empty).
      description: free text.
      chunk_size: configurations per device per compiled call (>= 1).
      steps: recorded fine-tuning step counts, ascending, unique, >= 0.
      truncation_ranks: k values of rho_k, ascending, unique, >= 1.
      params: fixed parameter values (only those given in the file).
      axes: swept parameters -> list of values, or a ``{linspace|logspace|range = [...]}`` table.
    """

    name: str
    description: str = ""
    chunk_size: int = 256
    steps: tuple[int, ...] = (0, 100)
    truncation_ranks: tuple[int, ...] = (1, 4)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    axes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def value(self, name: str) -> Any:
        """The fixed value of a non-swept parameter (its default if not given)."""
        return self.params.get(name, PARAMS[name].default)

    def axis_values(self, name: str) -> list:
        """The expanded values of axis ``name``."""
        return expand_axis(self.axes[name], PARAMS[name])

    def to_toml(self) -> str:
        """Canonical TOML text: sorted keys, normalised values."""
        return _dump(self.to_dict())

    def to_dict(self) -> dict:
        return {
            "axes": dict(sorted(self.axes.items())),
            "chunk_size": self.chunk_size,
            "description": self.description,
            "name": self.name,
            "params": dict(sorted(self.params.items())),
            "steps": list(self.steps),
            "truncation_ranks": list(self.truncation_ranks),
        }

    def hash(self) -> str:
        """sha256 of the canonical TOML text (first 16 hex digits)."""
        return hashlib.sha256(self.to_toml().encode()).hexdigest()[:16]

    def save(self, path) -> None:
        """Write :meth:`to_toml` to ``path`` atomically."""
        atomic_write_text(path, self.to_toml())


# ---------------------------------------------------------------- loading and validation


def load_config(path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read and validate a TOML config, then apply ``key=value`` overrides.

    Raises:
      ConfigError: unreadable TOML, unknown keys (with the closest valid key), wrong types,
        out-of-range values, empty axes, or inconsistent sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    return loads_config(path.read_text(), source=str(path), overrides=overrides)


def loads_config(text: str, *, source: str = "<string>", overrides=()) -> SweepConfig:
    """Like :func:`load_config` on TOML text."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not valid TOML: {err}") from None
    raw = apply_overrides(raw, overrides)
    return _validate(raw, source)


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply ``--set`` overrides to a raw config dict (returns a new dict).

    ``KEY=VALUE`` with VALUE parsed as TOML (a bare word is a string). ``name=…`` fixes parameter
    ``name`` (removing it from the axes); ``axes.name=[…]`` sweeps it (removing it from params);
    ``params.name``, ``steps``, ``chunk_size``… set that key.

    Raises:
      ConfigError: an override without ``=``.
    """
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override {item!r} must have the form KEY=VALUE (e.g. --set lr=0.1)."
            )
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        parts = key.split(".")
        if len(parts) == 1 and key in PARAMS:
            parts = ["params", key]
        if len(parts) == 2 and parts[0] in ("params", "axes"):
            table, name = parts
            other = "axes" if table == "params" else "params"
            raw.setdefault(table, {})[name] = value
            raw.get(other, {}).pop(name, None)
        elif len(parts) == 1:
            raw[key] = value
        else:
            raise ConfigError(
                f"Override key {key!r} must be a top-level key, params.NAME or axes.NAME."
            )
    return raw


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _check_keys(table: dict, valid, where: str, source: str) -> None:
    for key in table:
        if key not in valid:
            raise ConfigError(f"Unknown key `{key}` in {where} of {source}.{_suggest(key, valid)}")


def _typed(name: str, value, spec: ParamSpec, source: str):
    """Check the type and range of one value, returning it normalised (ints -> float for floats)."""
    kind = spec.kind
    ok = (
        (kind is int and isinstance(value, int) and not isinstance(value, bool))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
    )
    if not ok:
        want = {int: "an integer", float: "a number", str: "a string"}[kind]
        raise ConfigError(
            f"`{name}` must be {want}; got {value!r} ({type(value).__name__}) in {source}."
        )
    if kind is float:
        value = float(value)
    if spec.choices is not None:
        if value not in spec.choices:
            raise ConfigError(
                f"`{name}` must be {spec.range_text()}; got {value!r} in {source}."
                f"{_suggest(value, spec.choices)}"
            )
        return value
    bad_low = spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)
    bad_high = spec.high is not None and (
        value >= spec.high if spec.high_open else value > spec.high
    )
    if (kind is float and not math.isfinite(value)) or bad_low or bad_high:
        raise ConfigError(f"`{name}` must be {spec.range_text()}; got {value!r} in {source}.")
    return value


def _int_list(name: str, value, minimum: int, source: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"`{name}` must be a non-empty list of integers; got {value!r} in {source}."
        )
    spec = ParamSpec(int, 0, name, minimum, 10**9)
    out = tuple(_typed(f"{name}[{i}]", v, spec, source) for i, v in enumerate(value))
    if list(out) != sorted(set(out)):
        raise ConfigError(
            f"`{name}` must be ascending without repeats; got {list(out)} in {source}."
        )
    return out


def _validate_axis(name: str, value, source: str):
    spec = PARAMS[name]
    where = f"axes.{name}"
    if isinstance(value, dict):
        _check_keys(value, _AXIS_FORMS, f"[{where}]", source)
        if len(value) != 1:
            raise ConfigError(
                f"`{where}` must have exactly one of {', '.join(_AXIS_FORMS)}; got {value!r}."
            )
        ((form, args),) = value.items()
        if form == "range":
            if spec.kind is not int or not (isinstance(args, list) and len(args) == 2):
                raise ConfigError(
                    f"`{where}.range` needs an integer parameter and [start, stop]; got {args!r}."
                )
            start, stop = (
                _typed(f"{where}.range", a, ParamSpec(int, 0, "", -(2**31), 2**31), source)
                for a in args
            )
            norm = {"range": [start, stop]}
        else:
            if spec.kind is not float or not (isinstance(args, list) and len(args) == 3):
                raise ConfigError(
                    f"`{where}.{form}` needs a real parameter and [start, stop, num]; got {args!r}."
                )
            lo, hi = (
                _typed(f"{where}.{form}", a, ParamSpec(float, 0.0, "", -1e300, 1e300), source)
                for a in args[:2]
            )
            num = _typed(f"{where}.{form}[2]", args[2], ParamSpec(int, 0, "", 0, 10**7), source)
            norm = {form: [lo, hi, num]}
        values = expand_axis(norm, spec)
    elif isinstance(value, list):
        norm = values = value
    else:
        raise ConfigError(
            f"`{where}` must be a list of values or a table like "
            f"{{linspace = [0.0, 1.0, 5]}}; got {value!r}."
        )
    if len(values) == 0:
        raise ConfigError(f"`{where}` is empty in {source}; give at least one value.")
    checked = [_typed(f"{where}[{i}]", v, spec, source) for i, v in enumerate(values)]
    if len(set(checked)) != len(checked):
        raise ConfigError(f"`{where}` repeats a value in {source}; each value must appear once.")
    return norm if isinstance(norm, dict) else checked


def expand_axis(spec_value, spec: ParamSpec) -> list:
    """Values of an axis (a list, or a linspace/logspace/range table)."""
    if isinstance(spec_value, list):
        return list(spec_value)
    ((form, args),) = spec_value.items()
    if form == "range":
        return list(range(args[0], args[1]))
    grid = np.linspace(args[0], args[1], args[2])
    return [float(v) for v in (10.0**grid if form == "logspace" else grid)]


def _validate(raw: dict, source: str) -> SweepConfig:
    _check_keys(raw, _TOP_LEVEL, "the top level", source)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"`name` must be a non-empty string; got {name!r} in {source}.")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"`description` must be a string; got {description!r} in {source}.")
    chunk = _typed(
        "chunk_size", raw.get("chunk_size", 256), ParamSpec(int, 256, "", 1, 10**6), source
    )
    steps = _int_list("steps", raw.get("steps", [0, 100]), 0, source)
    ranks = _int_list("truncation_ranks", raw.get("truncation_ranks", [1, 4]), 1, source)
    params_raw, axes_raw = raw.get("params", {}), raw.get("axes", {})
    for table, label in ((params_raw, "params"), (axes_raw, "axes")):
        if not isinstance(table, dict):
            raise ConfigError(f"`{label}` must be a table ([{label}]); got {table!r} in {source}.")
        _check_keys(table, PARAMS, f"[{label}]", source)
    both = sorted(set(params_raw) & set(axes_raw))
    if both:
        raise ConfigError(
            f"`{both[0]}` is given in both [params] and [axes] of {source}; keep one."
        )
    params = {k: _typed(f"params.{k}", v, PARAMS[k], source) for k, v in sorted(params_raw.items())}
    axes = {k: _validate_axis(k, v, source) for k, v in sorted(axes_raw.items())}
    config = SweepConfig(name, description, chunk, steps, ranks, params, axes)
    _check_consistency(config, source)
    return config


def _extreme(config: SweepConfig, name: str, fn):
    return fn(config.axis_values(name)) if name in config.axes else config.value(name)


def _check_consistency(config: SweepConfig, source: str) -> None:
    k_max = _extreme(config, "num_concepts", max)
    k_min = _extreme(config, "num_concepts", min)
    m_min = _extreme(config, "embed_dim", min)
    if k_max + 1 > m_min:
        raise ConfigError(
            f"`embed_dim` must be >= `num_concepts` + 1 (embeddings with exact cosines); "
            f"got embed_dim={m_min}, "
            f"num_concepts={k_max} in {source}."
        )
    erased = _extreme(config, "num_erased", max)
    retain_one = "other_concepts" in (
        config.axis_values("finetune") if "finetune" in config.axes else [config.value("finetune")]
    )
    limit = k_min - 1 if retain_one else k_min
    if erased > limit:
        raise ConfigError(
            f"`num_erased` must be <= {limit} (num_concepts={k_min}"
            f"{', one concept must remain to fine-tune on' if retain_one else ''}); "
            f"got {erased} in {source}."
        )
    size = _extreme(config, "num_levels", min) * (_extreme(config, "dim", min) + m_min)
    if config.truncation_ranks[-1] > size:
        raise ConfigError(
            f"`truncation_ranks` must not exceed the number of Hessian eigenspaces L*(d+m)={size}; "
            f"got {config.truncation_ranks[-1]} in {source}."
        )


# ---------------------------------------------------------------- canonical TOML writer


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_scalar(v)}" for k, v in sorted(value.items())) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def _dump(data: dict) -> str:
    lines = [f"{k} = {_scalar(v)}" for k, v in sorted(data.items()) if not isinstance(v, dict)]
    for table, content in sorted((k, v) for k, v in data.items() if isinstance(v, dict)):
        lines += ["", f"[{table}]"] + [f"{k} = {_scalar(v)}" for k, v in sorted(content.items())]
    return "\n".join(lines) + "\n"
