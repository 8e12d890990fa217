"""Noto Color Emoji is a Debian package: where it could not be installed, its tests skip, saying so."""

from __future__ import annotations

import pytest

from bridge.realworld.sources import MissingDataError, noto_font


def _missing() -> str:
    try:
        noto_font()
    except MissingDataError as err:
        return str(err)
    return ""


NOTO_MISSING = _missing()
requires_noto = pytest.mark.skipif(bool(NOTO_MISSING), reason=NOTO_MISSING or "Noto is installed")
