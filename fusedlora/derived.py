"""Values derived from tensors that training does not change (a sparse adapter's layout, its
row view, its flat indices), kept while those very tensors are unchanged. Not for trained
parameters: a fused optimizer step does not bump a tensor's version."""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook


@contextlib.contextmanager
def outside_inference_mode():
    """Make tensors that are kept across calls as normal tensors, also when called under
    ``torch.inference_mode()``: an inference tensor kept in a cache could not be written
    in place nor saved for backward by the calls that follow outside inference mode.
    Grad mode stays off (it is off in inference mode); no-op outside inference mode."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


# Optimizer steps taken in this process (torch.optim's global post-step hook). A fused step
# (AdamW(fused=True), ...) writes parameters in place without bumping their version counter:
# caches of parameter values (the routed pool, a sparse merge's saved entries) also key on it.
_OPT_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _OPT_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    return _OPT_STEPS[0]


def same_key(a: tuple, b: tuple) -> bool:
    """Whether two cache keys are equal: their tensors the same objects, the rest equal (a
    tensor's == is elementwise)."""
    return len(a) == len(b) and all(x is y if isinstance(x, Tensor) else x == y for x, y in zip(a, b))


def version(t: Tensor, untracked=None):
    """``t._version``, or ``untracked`` for an inference tensor (made under
    ``torch.inference_mode()``), which keeps no version counter."""
    return untracked if t.is_inference() else t._version


class DerivedCache(dict):
    """key -> a value derived from some tensors (a layout, its row view, flat indices),
    served while those very tensors are unchanged: the same objects, at the same address
    and in-place version. A freed tensor's memory can come back at the same address with
    version 0, so an entry holds weak references to the tensors it was built from, and their
    storage (``t.data = new`` keeps the object and its version but frees the old storage,
    whose address a later swap could bring back). A dict, so that ``del cache[key]``
    forgets an entry; ``limit`` entries at most (then cleared)."""

    def __init__(self, limit: Optional[int] = None):
        super().__init__()
        self.limit = limit

    def get_or_build(self, key: Hashable, tensors: Sequence[Tensor], build: Callable, extra: Hashable = None):
        """The value for ``key`` if it was built from ``tensors`` as they are now (and the same
        ``extra``, e.g. a target device), else ``build()``, remembered."""
        # inference tensors keep no version counter: their address and identity must do
        stamp = (extra,) + tuple((t.data_ptr(), version(t)) for t in tensors)
        entry = self.get(key)
        if entry is not None and entry[0] == stamp and all(ref() is t for ref, t in zip(entry[1], tensors)):
            return entry[2]
        with outside_inference_mode():  # the value outlives this call
            value = build()
        if self.limit is not None and len(self) >= self.limit:
            self.clear()
        self[key] = (stamp, tuple(weakref.ref(t) for t in tensors), value, tuple(t.detach() for t in tensors))
        return value

    def __reduce__(self):
        # Pickled (torch.save of a module, deepcopy) as empty: the values are derived and
        # rebuilt on demand, and the weak references to their tensors cannot be pickled.
        return (type(self), (self.limit,))

    def latest(self, key: Hashable):
        """The value last built for ``key``, checked or not; None if there is none."""
        entry = self.get(key)
        return None if entry is None else entry[2]

    def put_unchecked(self, key: Hashable, value) -> None:
        """Remember ``value`` for ``key`` without a stamp: ``latest`` returns it, and the next
        ``get_or_build`` rebuilds it."""
        self[key] = (None, (), value)
