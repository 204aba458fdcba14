"""Faster fake-tensor dispatch for the predictor's traces: cheaper cache keys, more cache hits.

Most of a traced step's time is spent in FakeTensorMode's dispatch cache: building each
operation's key (every tensor argument becomes a ``TensorMetadata`` dataclass walked field by
field) and, on a miss, running the operation's meta kernel (several times the cost of a hit).
``cache_key_args`` appends the values PyTorch's own code appends, in the same order, for the
common case (a plain strided fake tensor of the mode, no symbolic sizes) and leaves every other
argument to PyTorch.

One difference, on purpose: for operations that neither return a view nor write into an
argument (``mm``, ``addmm``, ``_to_copy``, ...; told apart by their schema's alias annotations),
the key leaves out where each tensor argument sits in its storage (offset, storage size). Their
output is a new tensor whose shape, strides and dtype do not depend on it; but DeepSpeed makes
every parameter a view into one flat buffer, so with it each layer's ``linear`` would be a miss
of its own. The tests replay traced steps with PyTorch's cross-check (every hit recomputed and
compared) and compare whole predictions with and without these keys.

``faster_dispatch()`` installs both for the duration of a trace, only after checking on sample
tensors that the key builder agrees with PyTorch's (a PyTorch whose internals differ keeps its
own code). It also calls FakeTensorMode's ``__torch_dispatch__`` without the guard PyTorch wraps
around every mode's (``torch._disable_dynamo``: it switches TorchDynamo's frame hook off and on
again, several Python calls per operation, to keep ``torch.compile`` out of dispatch code); no
traced step compiles anything, and the tests compare whole predictions made with and without.
"""

from __future__ import annotations

import functools

import torch
from torch._prims_common import are_strides_like_channels_last_or_false
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

_TORCH_KEY_ARGS = FakeTensorMode._prep_args_for_hash  # PyTorch's own, kept before m3lab.compat replaces it
_TORCH_CACHE_KEY = FakeTensorMode._cache_key
UNGUARD_DISPATCH = True  # the tests switch it off to compare with PyTorch's guarded dispatch
# Argument types whose key is just (type, value), as PyTorch's own code makes it
_PLAIN = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format))
_SEQUENCES = frozenset((list, tuple, torch.Size))


# Set while the key of an operation that neither aliases nor mutates its arguments is built
_placement_free = False


@functools.cache
def _aliases_or_mutates(func) -> bool:
    schema = func._schema
    return func.is_view or any(a.alias_info is not None for a in schema.arguments) \
        or any(r.alias_info is not None for r in schema.returns)


def _append_tensor(append, extend, tensor) -> None:
    """TensorMetadata of a strided, non-symbolic tensor, flattened as TensorMetadata._flatten_into
    does (with the storage offset and size left out when ``_placement_free``)."""
    shape, stride = tensor.shape, tensor.stride()
    dims = len(shape)
    memory_format = torch.contiguous_format
    if dims in (4, 5) and are_strides_like_channels_last_or_false(shape, stride):
        memory_format = torch.channels_last if dims == 4 else torch.channels_last_3d
    if not tensor.is_contiguous(memory_format=memory_format):
        memory_format = None
    append(tensor.dtype)
    append(torch.Size)
    append(f"length_{dims}")
    for size in shape:
        append(int)
        append(size)
    append(tuple)
    append(f"length_{dims}")
    for step in stride:
        append(int)
        append(step)
    # where the tensor sits in its storage: its offset and the storage's size
    placement = (None, None) if _placement_free else (tensor.storage_offset(), tensor.untyped_storage().nbytes())
    # device, layout, memory format, placement, requires_grad, is_quantized, is_conj, is_neg,
    # is_inference, is_sparse, is_coalesced, dense_dim, sparse_dim
    extend((tensor.device, torch.strided, memory_format, *placement, tensor.requires_grad, tensor.is_quantized,
            tensor.is_conj(), tensor.is_neg(), tensor.is_inference(), False, None, None, None))


def cache_key(mode, state, func, args, kwargs):
    """Drop-in for ``FakeTensorMode._cache_key``: PyTorch's key, placement-free where it cannot matter."""
    global _placement_free
    _placement_free = isinstance(func, torch._ops.OpOverload) and not _aliases_or_mutates(func)
    try:
        return _TORCH_CACHE_KEY(mode, state, func, args, kwargs)
    finally:
        _placement_free = False


def cache_key_args(mode, result, args, state, id_hashed_objects) -> None:
    """Drop-in for ``FakeTensorMode._prep_args_for_hash``: the same values appended to ``result``."""
    kind = type(args)
    if kind in _SEQUENCES:
        result.append(kind)
        result.append(f"length_{len(args)}")
    elif isinstance(args, (list, tuple, dict)):  # dicts and sequence subclasses: PyTorch's own way
        return _TORCH_KEY_ARGS(mode, result, args, state, id_hashed_objects)
    append, extend = result.append, result.extend
    for arg in args:
        kind = type(arg)
        if kind is FakeTensor and arg.fake_mode is mode and arg.constant is None \
                and arg.layout is torch.strided and not arg._has_symbolic_sizes_strides:
            _append_tensor(append, extend, arg)
        elif kind in _PLAIN:
            append(kind)
            append(arg)
        elif kind in _SEQUENCES:
            cache_key_args(mode, result, arg, state, id_hashed_objects)
        else:  # anything else (symbolic sizes, other tensors, callables): PyTorch decides, or bypasses
            _TORCH_KEY_ARGS(mode, result, iter((arg,)), state, id_hashed_objects)


def _sample_args(mode: FakeTensorMode) -> list:
    with mode:
        base = torch.empty(2, 3, 4, 5)
        return [(base, 1, 2.0, True, None, [3, (4, 5)], torch.float16, torch.Size([2, 3])),
                (base.transpose(1, 2), base[1:], base.to(memory_format=torch.channels_last), base.half().requires_grad_()),
                {"dim": 1, "keepdim": False}, (torch.empty(0, dtype=torch.int64), torch.empty((), dtype=torch.bool))]


@functools.cache
def builds_torch_keys() -> bool:
    """Whether ``cache_key_args`` builds the keys this PyTorch builds, on sample arguments."""
    from torch._subclasses.fake_tensor import _CacheKeyState

    try:
        mode = FakeTensorMode()
        for args in _sample_args(mode):
            ours, theirs = [], []
            cache_key_args(mode, ours, args, _CacheKeyState(None), [])
            _TORCH_KEY_ARGS(mode, theirs, args, _CacheKeyState(None), [])
            if ours != theirs:
                return False
        return True
    except Exception:  # internals changed shape: keep PyTorch's own code
        return False


def faster_dispatch():
    """While the block runs: ``cache_key`` and ``cache_key_args`` in place of PyTorch's (if they
    agree with it), and FakeTensorMode's dispatch without the no-compile guard (see m3lab.compat)."""
    from m3lab import compat

    return compat.fake_tensor_fast_dispatch(cache_key, cache_key_args, builds_torch_keys(), UNGUARD_DISPATCH)
