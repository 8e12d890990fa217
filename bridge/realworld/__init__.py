"""The testbed on real images: emoji drawn by OpenMoji and Noto, conditioned on a frozen MiniLM.

``sources`` (offline data packages, licences), ``concepts`` (the concept table, CLDR names,
synonyms), ``world`` (seeded augmented renders), ``text`` (MiniLM token states as UNet
conditioning), ``protocol`` (the paper authors' fine-tuning protocol) and ``table`` (their
long-format results), ``classifier`` (presence and style CNNs), ``train`` / ``pipeline`` (UNet
training), ``bundle`` and ``fingerprints`` (saved models verified by sha256). See
docs/realworld.md. Heavy imports stay inside the submodules, as in ``bridge.testbed``:
``from bridge.realworld.world import RealWorld``.
"""

__all__ = [
    "bundle",
    "classifier",
    "concepts",
    "config",
    "fingerprints",
    "pipeline",
    "protocol",
    "sources",
    "table",
    "text",
    "train",
    "world",
]
