"""Faster fake-tensor dispatch for the predictor's traces: cheaper cache keys, more cache hits.

Most of a traced step's time is spent in FakeTensorMode's dispatch cache: building each
operation's key (every tensor argument becomes a ``TensorMetadata`` dataclass walked field by
field) and, on a miss, running the operation's meta kernel (several times the cost of a hit).
``cache_key_args`` appends the values PyTorch's own code appends, in the same order, for the
common case (a plain strided fake tensor of the mode, no symbolic sizes) and leaves every other
argument to PyTorch.

One difference, on purpose: the key leaves out where each tensor argument sits in its storage
(offset, storage size) for operations whose output does not depend on it. DeepSpeed makes every
parameter a view into one flat buffer and every gradient a view into its bucket, so with the
placement in the key each layer's operations would be misses of their own (on a miss, a fresh
process runs the operation's meta kernel, often through Python decompositions: about 0.8 ms for
a view, against 0.1 ms for a hit). Two kinds of operation qualify:
- those that neither return a view nor write into an argument (``mm``, ``addmm``, ``_to_copy``,
  ...; told apart by their schema's alias annotations): their output is a new tensor whose shape,
  strides and dtype do not depend on where the inputs sit;
- the views whose output sits in the input's storage at the input's offset plus an amount fixed
  by the key (``view``, ``slice``, ``t``, ``detach``, ``as_strided`` without an offset, ...;
  ``SHIFTING_VIEWS``): their cache entries hold the offset relative to the input's
  (``output_info``), and a hit adds the input's own back (``output_tensor``). ``as_strided`` with
  an offset puts its output there wherever the input sits. Not ``view(dtype)`` or
  ``view_as_real``: they rescale the offset. A ``slice`` that lies inside its input is keyed by
  its length instead of its start and end, its entry relative to its first element: DeepSpeed
  slices each parameter and gradient out of a flat buffer, the same lengths at ever new starts
  (a cold 3-layer ZeRO-1 trace: 313 misses of ``slice`` become 55).
A hit skips the meta kernel's check that a view fits in its storage, which only a program that
fails for real would need (the traced code is the real code, which runs).
The tests replay traced steps with PyTorch's cross-check (every hit recomputed and its shape,
strides and offset compared) and compare whole predictions with and without these keys.

``faster_dispatch()`` installs them for the duration of a trace, only after checking on sample
tensors that the key builder agrees with PyTorch's (a PyTorch whose internals differ keeps its
own code). It also calls FakeTensorMode's ``__torch_dispatch__`` without the guard PyTorch wraps
around every mode's (``torch._disable_dynamo``: it switches TorchDynamo's frame hook off and on
again, several Python calls per operation, to keep ``torch.compile`` out of dispatch code); no
traced step compiles anything, and the tests compare whole predictions made with and without.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch._prims_common import are_strides_like_channels_last_or_false
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from m3lab import compat

# PyTorch's own, which m3lab.compat replaces while a trace runs (a rename is a CompatError here)
_TORCH_KEY_ARGS = compat.original("torch._subclasses.fake_tensor", "FakeTensorMode._prep_args_for_hash")
_TORCH_CACHE_KEY = compat.original("torch._subclasses.fake_tensor", "FakeTensorMode._cache_key")
_TORCH_OUTPUT_INFO = compat.original("torch._subclasses.fake_tensor", "FakeTensorMode._get_output_info_for_cache_entry")
_TORCH_OUTPUT_TENSOR = compat.original("torch._subclasses.fake_tensor", "FakeTensorMode._get_output_tensor_from_cache_entry")
UNGUARD_DISPATCH = True  # the tests switch it off to compare with PyTorch's guarded dispatch
# Argument types whose key is just (type, value), as PyTorch's own code makes it
_PLAIN = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format))
_SEQUENCES = frozenset((list, tuple, torch.Size))


# Set while the key of an operation whose output does not depend on its inputs' placement is built
_placement_free = False
# Set while PyTorch checks a new cache entry by building an output from it (offsets still absolute)
_checking_new_entry = False

_aten = torch.ops.aten
# Views whose output's storage offset is the input's plus an amount fixed by the shapes, strides
# and arguments (all in the key); as_strided only without an offset argument (see _relative)
SHIFTING_VIEWS = frozenset((
    _aten.view.default, _aten._reshape_alias.default, _aten.alias.default, _aten.detach.default,
    _aten.t.default, _aten.transpose.int, _aten.permute.default, _aten.expand.default,
    _aten.unsqueeze.default, _aten.squeeze.default, _aten.squeeze.dim, _aten.squeeze.dims,
    _aten.slice.Tensor, _aten.select.int, _aten.narrow.default, _aten.split.Tensor,
    _aten.split_with_sizes.default, _aten.unbind.int, _aten.diagonal.default, _aten.unfold.default,
))


@functools.cache
def _aliases_or_mutates(func) -> bool:
    schema = func._schema
    return func.is_view or any(a.alias_info is not None for a in schema.arguments) \
        or any(r.alias_info is not None for r in schema.returns)


def _relative(func, args) -> bool:
    """Whether the cache entry of ``func`` holds its output's storage offset relative to its input's."""
    if func is _aten.as_strided.default:
        return len(args) < 4 or args[3] is None
    return func in SHIFTING_VIEWS


# False where this PyTorch's cache entries are not the ones output_info/output_tensor know (see
# places_views_right): views then keep PyTorch's keys and entries
_relative_views = True


def _placement_free_key(func, args, kwargs) -> bool:
    if not isinstance(func, torch._ops.OpOverload):
        return False
    if not _relative_views:
        return not _aliases_or_mutates(func)
    if func is _aten.as_strided.default:
        # its offset passed by keyword: the entry is kept relative (_relative sees args only), so
        # the key keeps the placement, and a hit sees the same input offset as the entry
        return "storage_offset" not in kwargs
    return func in SHIFTING_VIEWS or not _aliases_or_mutates(func)


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


def _slice_start(func, args) -> int | None:
    """For a ``slice`` that lies inside its input (0 <= start <= end <= size), its start; else None.

    DeepSpeed slices every parameter and gradient out of one flat buffer: the same lengths at
    ever new starts. Keyed by length instead of start and end (``cache_key``), with the entry's
    offset relative to the slice's first element (``_view_base``), those slices share entries.
    """
    # (slice has no keyword-only arguments: the dispatcher passes all of them in ``args``)
    if func is not _aten.slice.Tensor or not _relative_views or not 4 <= len(args) <= 5:
        return None
    tensor, dim, start, end = args[:4]
    if type(dim) is not int or type(start) is not int or type(end) is not int:  # noqa: E721 (no SymInts)
        return None
    if len(args) == 5 and (type(args[4]) is not int or args[4] < 1):  # noqa: E721
        return None
    shape = tensor.shape
    if not -len(shape) <= dim < len(shape) or not 0 <= start <= end <= shape[dim]:
        return None
    return start


def _view_base(func, args, index: int) -> int:
    """The storage offset a shifting view's entry is relative to: its input's, and for a slice keyed
    by its length, its first element's."""
    base = args[index].storage_offset()
    start = _slice_start(func, args)
    if start:
        base += start * args[0].stride(args[1])
    return base


def cache_key(mode, state, func, args, kwargs):
    """Drop-in for ``FakeTensorMode._cache_key``: PyTorch's key, placement-free where it cannot matter,
    and a slice inside its input keyed by its length (``_slice_start``)."""
    global _placement_free
    _placement_free = _placement_free_key(func, args, kwargs)
    start = _slice_start(func, args)
    if start:
        args = (args[0], args[1], 0, args[3] - start, *args[4:])
    try:
        return _TORCH_CACHE_KEY(mode, state, func, args, kwargs)
    finally:
        _placement_free = False


def output_info(mode, state, key, func, args, kwargs, output):
    """Drop-in for ``FakeTensorMode._get_output_info_for_cache_entry``: PyTorch's entry, with a
    shifting view's storage offset made relative to its input's."""
    global _checking_new_entry
    _checking_new_entry = True
    try:
        info = _TORCH_OUTPUT_INFO(mode, state, key, func, args, kwargs, output)
    finally:
        _checking_new_entry = False
    if info.view_idx is not None and info.metadata is not None and _relative(func, args):
        base = _view_base(func, args, info.view_idx)
        if type(info.metadata.storage_offset) is int and type(base) is int:  # noqa: E721 (no SymInts)
            info.metadata.storage_offset -= base
    return info


def output_tensor(mode, state, entry, key, func, args):
    """Drop-in for ``FakeTensorMode._get_output_tensor_from_cache_entry``: a shifting view's output
    placed at its entry's relative offset from where this input sits."""
    if not _checking_new_entry and entry.view_idx is not None and entry.metadata is not None \
            and _relative(func, args):
        base = _view_base(func, args, entry.view_idx)
        if type(base) is int and base and type(entry.metadata.storage_offset) is int:  # noqa: E721 (0: as stored)
            metadata = copy.copy(entry.metadata)
            metadata.storage_offset += base
            placed = copy.copy(entry)
            object.__setattr__(placed, "metadata", metadata)  # the entry is a frozen dataclass
            entry = placed
    return _TORCH_OUTPUT_TENSOR(mode, state, entry, key, func, args)


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


@functools.cache
def places_views_right() -> bool:
    """Whether, with output_info/output_tensor installed, views of one buffer at two offsets share a
    cache entry and each lands where it should (checked once per process, before its first trace:
    another PyTorch may build its entries differently, and a view at the wrong offset would not
    raise, only mislead)."""

    global _relative_views
    _relative_views = True
    try:
        with compat.fake_tensor_fast_dispatch(cache_key, cache_key_args, output_info, output_tensor, True, False), \
                FakeTensorMode():
            flat = torch.empty(97)
            views = [part.view(4, 4).t()[1:3] for part in (flat[5:21], flat[40:56], flat[5:21])]
            hits = FakeTensorMode.cache_hits
            views.append(flat[60:76].view(4, 4).t()[1:3])
            return [v.storage_offset() for v in views] == [6, 41, 6, 61] and FakeTensorMode.cache_hits >= hits + 3
    except Exception:  # internals changed shape: keep PyTorch's own entries
        return False


def faster_dispatch():
    """While the block runs: ``cache_key`` and ``cache_key_args`` in place of PyTorch's (if they
    agree with it), views' entries relative to their input's offset (if ``places_views_right``),
    and FakeTensorMode's dispatch without the no-compile guard (see m3lab.compat)."""

    global _relative_views
    keys_agree = builds_torch_keys()
    _relative_views = keys_agree and places_views_right()
    views = (output_info, output_tensor) if _relative_views else (None, None)
    return compat.fake_tensor_fast_dispatch(cache_key, cache_key_args, *views, keys_agree, UNGUARD_DISPATCH)
