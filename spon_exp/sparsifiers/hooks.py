"""One owner for a group of forward hooks: register, switch off together, remove all.

As llm-compressor's ``HooksMixin``: every hook owner (a sparsifier, a calibration recorder,
the greedy search's block-input capture, SPON's mean-dropped init) keeps its hooks in one
:class:`HookSet` instead of a hand-kept list of handles, so switching them off and taking
them down is the same for all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle


class Switchable:
    """Something that can be switched off without being taken down (``enabled`` / ``disabled()``)."""

    enabled: bool = True

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, every hook passes its tensor through untouched (the dense model)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


class HookSet(Switchable):
    """Forward (pre-)hooks registered through it; while switched off (``disabled()``) none of
    them runs and every module computes as if it had none. As a context manager the hooks
    are removed on exit (hooks that live for one calibration pass)."""

    def __init__(self) -> None:
        self.enabled = True
        self._handles: list[RemovableHandle] = []

    def pre(self, module: nn.Module, hook: Callable, *, prepend: bool = False,
            with_kwargs: bool = False) -> RemovableHandle:
        """``module.register_forward_pre_hook``; ``prepend`` runs it before the module's other
        pre-hooks (to see the raw input before a sparsifier changes it)."""
        return self._keep(module.register_forward_pre_hook(self._gated(hook), prepend=prepend,
                                                           with_kwargs=with_kwargs))

    def post(self, module: nn.Module, hook: Callable, *, prepend: bool = False) -> RemovableHandle:
        """``module.register_forward_hook``."""
        return self._keep(module.register_forward_hook(self._gated(hook), prepend=prepend))

    def remove(self) -> None:
        """Take every hook down (the set can be filled again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _keep(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle

    def _gated(self, hook: Callable) -> Callable:
        def gated(*args):
            return hook(*args) if self.enabled else None
        return gated
