"""Atomic operations on int64 array cells, for numba kernels (numba has none for the CPU).

The counter table's lock is one int64 word in shared memory: 0 when free, the holder's pid when
taken. Taking it is a compare-and-swap, releasing it an atomic exchange with release ordering, so
every write made under the lock is visible to the next holder, whichever process it is in.
"""

from __future__ import annotations

from typing import Any

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _cell_pointer(context: Any, builder: Any, array_type: Any, array: Any, index: Any) -> Any:
    view = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, view, [index])


@intrinsic
def compare_and_swap(typingctx: Any, array: Any, index: Any, expected: Any, new: Any) -> Any:
    """Set array[index] to `new` if it is `expected`; returns the value found (== expected on success)."""
    signature = types.int64(array, types.intp, types.int64, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        cell = _cell_pointer(context, builder, sig.args[0], args[0], args[1])
        result = builder.cmpxchg(cell, args[2], args[3], "acq_rel", "monotonic")
        return builder.extract_value(result, 0)

    return signature, codegen


@intrinsic
def store_release(typingctx: Any, array: Any, index: Any, value: Any) -> Any:
    """array[index] = value, after every earlier write of this thread is visible."""
    signature = types.void(array, types.intp, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        cell = _cell_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.atomic_rmw("xchg", cell, args[2], "release")
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def load_acquire(typingctx: Any, array: Any, index: Any) -> Any:
    """array[index], read before any later read of this thread."""
    signature = types.int64(array, types.intp)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        cell = _cell_pointer(context, builder, sig.args[0], args[0], args[1])
        zero = context.get_constant(types.int64, 0)
        return builder.atomic_rmw("add", cell, zero, "acquire")

    return signature, codegen
