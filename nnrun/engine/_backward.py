"""The backward pass of a batch: where gradients start, who reads them, the loss.

Model parameters never require gradients (the loader turns them off), so a forward
pass builds no graph by itself. The first site whose gradient a save reads gets a
fresh leaf (`value.detach().requires_grad_()`, the same numbers) and everything the
model computes from it afterwards is tracked; a later site whose value already depends
on a leaf is read where it is. A site whose value does not depend on any leaf gets a
leaf of its own, which is exact: nothing tracked flows into it. Nothing upstream of
the first such site keeps activations for the backward pass.

Each read registers a tensor hook, so its gradient arrives while autograd walks back;
`torch.autograd.grad` over the leaves runs the pass without filling any `.grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nnrun.errors import RunError


@dataclass
class GradRead:
    """One save's gradient read at one site: what to do when the gradient arrives."""

    label: str  # "save 'g' at model.layers.1.output"
    on_grad: Callable[[torch.Tensor], None]  # receives d loss / d value (batch, tokens, ...)
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class BackwardPass:
    """What one batch's backward pass needs: leaves, gradient reads and loss terms."""

    def __init__(self) -> None:
        self.leaves: list[torch.Tensor] = []
        self.reads: list[GradRead] = []
        self.arrived: set[int] = set()  # indices into reads whose gradient came
        self.terms: list[torch.Tensor] = []  # per-row losses, already weighted
        self._handles: list[Any] = []

    def track(self, value: torch.Tensor) -> torch.Tensor:
        """The value, or a leaf with the same numbers when nothing tracked flows into it."""
        if value.requires_grad:
            return value
        if not value.is_floating_point():
            raise RunError("a gradient needs a floating-point value, not integer token ids")
        leaf = value.detach().requires_grad_()
        self.leaves.append(leaf)
        return leaf

    def read(self, value: torch.Tensor, read: GradRead) -> None:
        """Deliver d loss / d `value` to `read` during the backward pass."""
        number = len(self.reads)
        self.reads.append(read)

        def hook(grad: torch.Tensor) -> None:
            self.arrived.add(number)
            with torch.no_grad():
                read.on_grad(grad)

        self._handles.append(value.register_hook(hook))

    def add_loss(self, values: torch.Tensor) -> None:
        """Add per-row losses (R,) (already scaled for `reduce: mean`)."""
        self.terms.append(values.sum())

    def run(self, loss_name: str) -> None:
        """Run the backward pass (see `_run`), then drop every hook, leaf and loss term.

        Hooks live on the batch's tensors and point back at this pass; removing them
        frees the batch's graph as soon as the batch ends rather than at the next
        garbage collection, which keeps memory flat over many batches.
        """
        try:
            self._run(loss_name)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.reads.clear()
            self.leaves.clear()
            self.terms.clear()

    def _run(self, loss_name: str) -> None:
        """Run the backward pass; every read gets its gradient or the run stops, saying why.

        A batch without any row of the loss has a loss of 0 that depends on nothing:
        every gradient it saves is exactly zero, and is written as such. A batch whose
        rows no gradient save selects needs no backward pass at all.
        """
        if not self.reads:
            return
        if not self.terms:
            for read in self.reads:
                with torch.no_grad():
                    read.on_grad(torch.zeros(read.shape, dtype=read.dtype, device=read.device))
            return
        loss = torch.stack(self.terms).sum()
        if not loss.requires_grad or not self.leaves:
            names = ", ".join(r.label for r in self.reads[:3]) or "no save"
            raise RunError(
                f"backward: the loss ({loss_name}) does not depend on any site whose gradient "
                f"is saved ({names}): no gradient would reach them (None)"
            )
        torch.autograd.grad(loss, self.leaves, allow_unused=True)
        missing = [r.label for i, r in enumerate(self.reads) if i not in self.arrived]
        if missing:
            raise RunError(
                f"{missing[0]}: the loss ({loss_name}) does not depend on this value, so it "
                "gets no gradient at all (None, not zero): the module's output does not reach "
                "the loss; save the gradient at a site the loss is computed from"
            )
