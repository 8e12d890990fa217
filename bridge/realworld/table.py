"""The authors' long-format results table (``results.csv``), with its schema checked on write and read.

One row is one number: ``algo`` (unlearning method, or ``"base"``), ``task``, ``config`` (the
unlearning config's label), ``finetune_algo`` (``"lora"``, ``"full"`` or ``"none"``),
``finetune_set`` (``"bin0"``.. or ``"none"``), ``prompts`` (``"erased"``, ``"synonyms"``,
``"others"``), ``seed``, ``type`` (the model state: ``"base"``, ``"unlearned"`` or
``"step=<n>"`` for a fine-tuning checkpoint), ``metric`` (e.g. ``"presence"``) and ``value``.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from bridge.realworld.protocol import PROMPT_GROUPS

__all__ = ["COLUMNS", "ResultsTable", "checkpoint_type", "step_of"]

#: Column names, in the authors' order.
COLUMNS: tuple[str, ...] = (
    "algo",
    "task",
    "config",
    "finetune_algo",
    "finetune_set",
    "prompts",
    "seed",
    "type",
    "metric",
    "value",
)
_FINETUNE_ALGOS = ("lora", "full", "none")
_TYPE = re.compile(r"^(base|unlearned|step=\d+)$")


def checkpoint_type(step: int) -> str:
    """``type`` value of a fine-tuning checkpoint: ``"step=100"``."""
    return f"step={int(step)}"


def step_of(type_: str) -> int | None:
    """Fine-tuning step of a ``type`` value (``None`` for ``"base"`` / ``"unlearned"``)."""
    return int(type_.split("=")[1]) if type_.startswith("step=") else None


def _row(values: dict) -> dict:
    missing = [c for c in COLUMNS if c not in values]
    extra = [k for k in values if k not in COLUMNS]
    if missing or extra:
        raise ValueError(
            f"a results row needs exactly the columns {', '.join(COLUMNS)}; "
            f"missing {missing}, unknown {extra}."
        )
    row = dict(values)
    if row["prompts"] not in PROMPT_GROUPS:
        raise ValueError(
            f"`prompts` must be one of {', '.join(PROMPT_GROUPS)}, got {row['prompts']!r}."
        )
    if row["finetune_algo"] not in _FINETUNE_ALGOS:
        raise ValueError(
            f"`finetune_algo` must be one of {', '.join(_FINETUNE_ALGOS)}, got {row['finetune_algo']!r}."
        )
    if not _TYPE.match(str(row["type"])):
        raise ValueError(f"`type` must be 'base', 'unlearned' or 'step=<n>', got {row['type']!r}.")
    try:
        row["seed"], row["value"] = int(row["seed"]), float(row["value"])
    except (TypeError, ValueError):
        raise ValueError(
            f"`seed` must be an integer and `value` a number, got {row['seed']!r}, {row['value']!r}."
        ) from None
    if not math.isfinite(row["value"]):
        raise ValueError(f"`value` must be finite, got {row['value']!r} ({row['metric']}).")
    for key in ("algo", "task", "config", "finetune_set", "metric"):
        row[key] = str(row[key])
        if not row[key] or row[key] != row[key].strip():
            raise ValueError(
                f"`{key}` must be a non-empty string without outer spaces, got {row[key]!r}."
            )
    return row


class ResultsTable:
    """Rows of :data:`COLUMNS`, each validated on :meth:`add`; CSV in and out."""

    def __init__(self, rows=()) -> None:
        self.rows: list[dict] = []
        for row in rows:
            self.add(**row)

    def add(self, **values) -> None:
        """Append one row (keyword per column).

        Raises:
          ValueError: naming the missing/unknown columns or the bad value.
        """
        self.rows.append(_row(values))

    @classmethod
    def merge(cls, tables) -> ResultsTable:
        """One table of several runs' tables (e.g. one run per method, run side by side).

        A row that two runs both measured (the base model's scores, which every run computes)
        is kept once when the values agree.

        Raises:
          ValueError: two runs give different values for the same row (naming it).
        """
        merged, seen = cls(), {}
        for table in tables:
            for row in table.rows:
                key = tuple(row[c] for c in COLUMNS[:-1])
                if key in seen:
                    if seen[key] != row["value"]:
                        raise ValueError(
                            f"two runs disagree on {dict(zip(COLUMNS[:-1], key, strict=True))}: "
                            f"{seen[key]!r} vs {row['value']!r}; were they run with one config?"
                        )
                    continue
                seen[key] = row["value"]
                merged.rows.append(dict(row))
        return merged

    def __len__(self) -> int:
        return len(self.rows)

    def to_csv(self, path: str | Path) -> Path:
        """Write the table (header = :data:`COLUMNS`) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({**r, "value": repr(r["value"])} for r in self.rows)
        tmp.replace(path)
        return path

    @classmethod
    def read_csv(cls, path: str | Path) -> ResultsTable:
        """Read a table written by :meth:`to_csv`.

        Raises:
          ValueError: if the header is not :data:`COLUMNS` (naming the file) or a row is bad.
        """
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ValueError(
                    f"{path} is not a results table: its header is {reader.fieldnames}, "
                    f"expected {list(COLUMNS)}."
                )
            return cls(list(reader))
