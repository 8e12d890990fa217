r"""The Hessian of the frozen diffusion loss as a linear operator, and what is read off it.

:class:`HessianOperator` subclasses curvlinops' ``PyTorchLinearOperator`` (``@``, ``.to_scipy()``,
``SELF_ADJOINT``). curvlinops' own ``HessianLinearOperator`` is not used: it re-evaluates the
model under ``jvp(jacrev)`` in ``no_grad`` and fails on a diffusers UNet (architecture.md). What
this module adds: the frozen diffusion quadrature as data; Hessian-vector products that reuse one
first-order graph per probe batch (``graph-reuse``, the default), or rebuild it per product
(``double-backward``), or take a central difference of gradients (``finite-difference``, no
second-order graph at all); an automatic fallback to the math SDPA kernel, then the classic
attention processor, where fused attention has no second derivative; and a determinism check
(:mod:`bridge._determinism`) whose tolerance comes from a measured noise floor. Spectra:
:mod:`bridge.spectra`.

.. math:: (Hv)_b = \nabla_\theta \langle \nabla_\theta L_b(\theta), v \rangle,
          \quad H v = \frac{1}{N_b}\sum_b (H v)_b
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from curvlinops._torch_base import PyTorchLinearOperator
from tqdm.auto import tqdm

from bridge._determinism import (
    DeterminismReport,
    NonDeterministicError,
    check_operator_determinism,
)
from bridge.loss import FrozenDiffusionLoss, frozen_params
from bridge.spectra import (  # re-exported: the operator and what is read off it, in one place
    SPECTRUM_METHODS,
    Eigenpairs,
    curvature_along,
    dense_hessian,
    hutchpp_trace,
    spectral_density,
    spectrum_ends,
    top_eigenpairs,
)

__all__ = [
    "HVP_METHODS",
    "SPECTRUM_METHODS",
    "DeterminismReport",
    "Eigenpairs",
    "curvature_along",
    "dense_hessian",
    "hutchpp_trace",
    "spectral_density",
    "spectrum_ends",
    "top_eigenpairs",
    "HessianOperator",
    "NonDeterministicError",
]

HvpMethod = Literal["graph-reuse", "double-backward", "forward-over-reverse", "finite-difference"]
#: Hessian-vector product implementations (benchmarks/bench_bridge_curvature.py, tiny UNet):
#: ``graph-reuse`` (default) keeps each batch's first-order graph and runs one backward per
#: product; ``double-backward`` rebuilds that graph for every product (same numbers, bitwise, at
#: the memory of one batch's graph); ``finite-difference`` needs no second-order graph;
#: ``forward-over-reverse`` (``jvp`` of ``grad``) is exact but the slowest.
HVP_METHODS: tuple[str, ...] = HvpMethod.__args__
_FALLBACKS = ("sdpa-math", "classic-processor")


def _is_attention_ad_failure(err: Exception) -> bool:
    msg = str(err).lower()
    return isinstance(err, NotImplementedError | RuntimeError) and (
        "forward ad" in msg or "derivative for" in msg or "not implemented" in msg
    )


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the tensors autograd saves, skipping storages already resident.

    Saved-tensor hooks switch off autograd's in-place check, so the version of every saved
    tensor is recorded here and checked again when a retained graph is used.
    """

    def __init__(self, resident: set[int]):
        self.nbytes = 0
        seen = set(resident)

        def pack(t: torch.Tensor):
            with contextlib.suppress(RuntimeError, NotImplementedError):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    self.nbytes += storage.nbytes()
            return t, t._version

        def unpack(packed) -> torch.Tensor:
            t, version = packed
            if t._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by "
                    f"an inplace operation (a saved {tuple(t.shape)} tensor)"
                )
            return t

        super().__init__(pack, unpack)


def _available_bytes(device: torch.device) -> float:
    """Free memory of ``device`` now (CUDA: free device memory; CPU: free physical pages)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not Linux: no way to tell without psutil
        return float("inf")


class HessianOperator(PyTorchLinearOperator):
    """Hessian of a :class:`~bridge.loss.FrozenDiffusionLoss` at theta, shape ``(n, n)``.

    Memory of ``graph-reuse``: the retained first-order graphs hold, per probe batch, the
    activations of the forward pass and of the backward pass built with ``create_graph=True``
    (``graph_bytes`` after the first product: 2.4x the forward activations; 11 MB per batch of
    two 16x16 samples on the tiny UNet; benchmarks/gpu_check.sh reports it at SD v1.4 size).
    Batches are cached in order while the total stays under ``graph_memory_limit``; the rest are
    rebuilt at every product (as ``double-backward``), with a warning. The graphs freeze the
    UNet's *other* weights at the first product: call :meth:`release_graph` after changing them.

    Args:
      loss: the frozen loss (defines the parameter group and the probe batches).
      theta: flat parameters ``(n,)`` at which H is taken (default: the UNet's current ones).
      method: one of :data:`HVP_METHODS`. ``finite-difference`` uses
        ``(grad(theta + h v) - grad(theta - h v)) / 2h``: two gradients, no second-order graph.
      fd_step: relative step of the finite difference (default: cube root of machine epsilon).
      graph_memory_limit: bytes the retained graphs of ``graph-reuse`` may hold (default: half
        the device's free memory when the graphs are built).
      check_deterministic: run :meth:`check_deterministic` once at construction.
      batch_indices: the probe batches this operator sums (default all); with ``all_reduce``
        this shards the batches over processes (see :mod:`bridge.parallel`).
      all_reduce: in-place sum of a tensor over processes (default: none).
      progress: tqdm bar over matrix-vector products.

    Attributes:
      num_matvecs: Hessian-vector products computed so far.
      attention_fallback: None, ``"sdpa-math"`` or ``"classic-processor"`` once engaged.
      graph_bytes: bytes of saved tensors held by the retained graphs (0 when none).
      graph_batches: number of probe batches whose graph is retained.
      determinism: the :class:`DeterminismReport` of the last check (None before).

    Raises:
      ValueError: for an unknown ``method``.
      NonDeterministicError: if ``check_deterministic`` finds differing evaluations.
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        loss: FrozenDiffusionLoss,
        theta: torch.Tensor | None = None,
        *,
        method: HvpMethod = "graph-reuse",
        fd_step: float | None = None,
        graph_memory_limit: float | None = None,
        check_deterministic: bool = True,
        batch_indices: Sequence[int] | None = None,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
        progress: bool = False,
    ):
        if method not in HVP_METHODS:
            raise ValueError(f"`method` must be one of {HVP_METHODS}, got {method!r}")
        n = loss.numel
        super().__init__([(n,)], [(n,)])
        self.loss = loss
        self.theta = (loss.theta() if theta is None else theta).detach().to(loss.device, loss.dtype)
        self.method = method
        self.fd_step = fd_step or float(torch.finfo(loss.dtype).eps) ** (1 / 3)
        self.graph_memory_limit = graph_memory_limit
        self.batch_indices = (
            list(range(len(loss.batches))) if batch_indices is None else list(batch_indices)
        )
        self.all_reduce = all_reduce
        self.num_matvecs = 0
        self.attention_fallback: str | None = None
        self.determinism: DeterminismReport | None = None
        self._graph: dict[int, torch.Tensor] | None = None  # batch index -> grad (create_graph)
        self._leaf: torch.Tensor | None = None
        self.graph_bytes = 0
        self._bar = tqdm(desc="Hessian-vector products", unit="HVP", disable=not progress)
        if check_deterministic:
            self.check_deterministic()

    @property
    def device(self) -> torch.device:
        """Device of the UNet and of the vectors."""
        return self.loss.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the UNet and of the vectors."""
        return self.loss.dtype

    @property
    def graph_batches(self) -> int:
        """Number of probe batches whose first-order graph is retained."""
        return 0 if self._graph is None else len(self._graph)

    # -- attention fallback --------------------------------------------------------------------
    def _attention_context(self):
        if self.attention_fallback == "sdpa-math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def _engage_fallback(self, err: Exception) -> None:
        """Step to the next attention fallback, or re-raise when none is left."""
        done = _FALLBACKS.index(self.attention_fallback) + 1 if self.attention_fallback else 0
        if done >= len(_FALLBACKS):
            raise err
        self.release_graph()  # built with the kernel that just failed
        self.attention_fallback = _FALLBACKS[done]
        if self.attention_fallback == "classic-processor":
            from diffusers.models.attention_processor import AttnProcessor

            self.loss.unet.set_attn_processor(AttnProcessor())
        warnings.warn(
            f"attention cannot be differentiated twice here ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120]}); switching to {self.attention_fallback}",
            stacklevel=4,
        )

    def _second_order(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``fn`` (second-order autograd) under the attention context, falling back on error."""
        while True:
            try:
                with self._attention_context(), frozen_params(self.loss.unet), torch.no_grad():
                    return fn()
            except (NotImplementedError, RuntimeError) as err:
                if not _is_attention_ad_failure(err) or self.method == "finite-difference":
                    raise
                self._engage_fallback(err)

    # -- first-order graphs --------------------------------------------------------------------
    def _first_order(self, index: int, leaf: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(
                self.loss.batch_loss(leaf, index), leaf, create_graph=True
            )
        return grad

    def _resident_storages(self) -> set[int]:
        tensors = [*self.loss.unet.parameters(), *self.loss.unet.buffers(), self.theta]
        for b in self.loss.batches:
            tensors += [b.noisy, b.timesteps, b.cond, b.target]
        return {t.untyped_storage().data_ptr() for t in tensors}

    def _build_graph(self) -> dict[int, torch.Tensor]:
        """Retain the first-order graph of each local batch, in order, while memory allows."""
        limit = self.graph_memory_limit
        limit = 0.5 * _available_bytes(self.device) if limit is None else float(limit)
        self._leaf = self.theta.clone().requires_grad_(True)
        graph: dict[int, torch.Tensor] = {}
        resident, total, reason = self._resident_storages(), 0, ""
        for i in self.batch_indices:
            counter = _SavedBytes(resident | {self._leaf.untyped_storage().data_ptr()})
            try:
                with counter:
                    grad = self._first_order(i, self._leaf)
            except torch.OutOfMemoryError:
                reason = "out of memory"
                break
            if total + counter.nbytes > limit:
                del grad
                reason = f"graph_memory_limit={limit:.3g} bytes"
                break
            graph[i], total = grad, total + counter.nbytes
        if len(graph) < len(self.batch_indices):
            warnings.warn(
                f"graph-reuse: the first-order graphs of {len(graph)} of "
                f"{len(self.batch_indices)} probe batches are retained ({total / 2**20:.1f} MiB; "
                f"next one exceeds {reason}); the others are rebuilt at every product",
                stacklevel=5,
            )
        self._graph, self.graph_bytes = graph, total
        return graph

    def release_graph(self) -> None:
        """Free the retained first-order graphs (rebuilt at the next product, if graph-reuse)."""
        self._graph, self._leaf, self.graph_bytes = None, None, 0

    # -- products ------------------------------------------------------------------------------
    def _batch_hvp(self, index: int, columns: torch.Tensor, method: str) -> torch.Tensor:
        """(H_b V) for batch ``index`` and ``columns`` of shape ``(n, K)``; returns ``(n, K)``."""
        f = self.loss.batch_loss
        if method == "finite-difference":
            out = []
            scale = max(1.0, float(self.theta.norm()))
            for v in columns.T:
                h = self.fd_step * scale / max(float(v.norm()), 1e-300)
                gp = torch.func.grad(f)(self.theta + h * v, index)
                gm = torch.func.grad(f)(self.theta - h * v, index)
                out.append((gp - gm) / (2 * h))
            return torch.stack(out, dim=1)
        if method == "forward-over-reverse":
            g = torch.func.grad(f)
            cols = [
                torch.func.jvp(lambda x: g(x, index), (self.theta,), (v,))[1] for v in columns.T
            ]
            return torch.stack(cols, dim=1)
        if method == "graph-reuse":
            leaf, grad = self._leaf, self._graph[index]
        else:  # double-backward: this product's own graph, freed on return
            leaf = self.theta.clone().requires_grad_(True)
            grad = self._first_order(index, leaf)
        try:
            cols = [torch.autograd.grad(grad, leaf, v, retain_graph=True)[0] for v in columns.T]
        except RuntimeError as err:
            if method == "graph-reuse" and "modified by an inplace operation" in str(err):
                raise RuntimeError(
                    "graph-reuse: the UNet's weights changed in place after this operator built "
                    "its first-order graphs; call op.release_graph() to take H at the new "
                    "weights, or build a new HessianOperator"
                ) from err
            raise
        return torch.stack(cols, dim=1)

    def _local_products(self, columns: torch.Tensor, *, fresh: bool = False) -> torch.Tensor:
        """Sum over this process's batches of H_b V; ``fresh`` rebuilds every graph."""
        reuse = self.method == "graph-reuse" and not fresh
        if reuse and self._graph is None:
            self._build_graph()
        rebuilt = "double-backward" if self.method == "graph-reuse" else self.method
        total = torch.zeros_like(columns)
        for i in self.batch_indices:  # the same order for every method: bitwise-equal sums
            method = "graph-reuse" if reuse and i in self._graph else rebuilt
            total = total + self._batch_hvp(i, columns, method)
        return total

    def _reduce(self, total: torch.Tensor, what: str) -> torch.Tensor:
        if self.all_reduce is not None:
            self.all_reduce(total)
        total = total / (len(self.loss.batches) if self.all_reduce is None else self._global())
        if not torch.isfinite(total).all():
            raise FloatingPointError(
                f"non-finite {what} ({int((~torch.isfinite(total)).sum())} of "
                f"{total.numel()} entries) for group {self.loss.group.spec!r}; check the loss is "
                "finite at theta (float16 overflow? diverged weights?) and use float32/float64"
            )
        return total

    def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
        """Curvlinops hook: ``X = [V]`` with V ``(n, K)``; returns ``[H V]``."""
        (columns,) = X
        total = self._reduce(
            self._second_order(lambda: self._local_products(columns)), "Hessian-vector product"
        )
        self.num_matvecs += columns.shape[1]
        self._bar.update(columns.shape[1])
        return [total]

    def fresh_product(self, v: torch.Tensor) -> torch.Tensor:
        """H v with every first-order graph rebuilt (bypasses ``graph-reuse``'s cache), ``(n,)``."""
        out = self._second_order(lambda: self._local_products(v[:, None], fresh=True))
        self.num_matvecs += 1
        return self._reduce(out, "Hessian-vector product")[:, 0]

    def _global(self) -> int:
        """Number of batches over all processes (one all-reduce, then cached)."""
        if getattr(self, "_num_global", None) is None:
            count = torch.tensor([float(len(self.batch_indices))], dtype=torch.float64)
            self.all_reduce(count)
            self._num_global = int(count.item())
        return self._num_global

    def gradient(self) -> torch.Tensor:
        """grad L(theta) over this operator's batches (all-reduced), flat ``(n,)``."""
        total = torch.zeros_like(self.theta)
        with frozen_params(self.loss.unet), torch.no_grad():
            for i in self.batch_indices:
                cached = None if self._graph is None else self._graph.get(i)
                total = total + (
                    torch.func.grad(self.loss.batch_loss)(self.theta, i)
                    if cached is None
                    else cached.detach()
                )
        return self._reduce(total, "gradient")

    # -- determinism ---------------------------------------------------------------------------
    def one_graph_products(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H_b u for each u through ONE first-order graph of the first local batch b.

        Nothing random is re-drawn between the products (the retained graph under
        ``graph-reuse``, else one built for this call), so their differences are round-off only.

        Args:
          vectors: flat ``(n,)`` tensors in the operator's dtype.

        Returns:
          The products, unnormalised (batch b's Hessian); empty when this process has no batch.
        """
        if not self.batch_indices:
            return []
        index = self.batch_indices[0]

        def products():
            if self.method == "graph-reuse" and self._graph is None:
                self._build_graph()
            if self.method == "graph-reuse" and index in self._graph:
                leaf, grad = self._leaf, self._graph[index]
            else:
                leaf = self.theta.clone().requires_grad_(True)
                grad = self._first_order(index, leaf)
            return [torch.autograd.grad(grad, leaf, u, retain_graph=True)[0] for u in vectors]

        return self._second_order(products)

    def check_deterministic(self, *, seed: int = 0) -> DeterminismReport:
        """Evaluate the loss and one Hessian-vector product twice and require agreement.

        The tolerance per dtype is derived from a measured noise floor; see
        :func:`bridge._determinism.check_operator_determinism`.

        Args:
          seed: seed of the random test vectors.

        Returns:
          The :class:`DeterminismReport` (also stored as ``self.determinism``).

        Raises:
          NonDeterministicError: naming the quantity, the size of the difference and the fixes.
          FloatingPointError: if the loss is not finite.
        """
        self.determinism = check_operator_determinism(self, seed=seed)
        return self.determinism
