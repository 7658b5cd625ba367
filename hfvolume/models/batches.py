"""Data as the model sees it: materialising batches once, moving them to a device, and walking nested batches.

A *batch* is whatever a data loader yields and a model accepts: a tensor, a mapping (``dict``, ``BatchEncoding``,
a 🤗 ``ModelOutput``), a tuple/list/namedtuple, nested to any depth. Every traversal of such a structure goes through
:func:`walk` (read) or :func:`map_batch` (rebuild), so the rules for what counts as a container live in one place:

* mappings are rebuilt as plain ``dict`` (their values in order);
* namedtuples are rebuilt with their own type, other tuples and lists with ``type(obj)(items)``;
* everything else (tensors, strings, numbers, ``None``) is a leaf.

:func:`materialize_batches` iterates user data exactly once, so that every evaluation of a behaviour sees the same
examples, and does so without moving the caller's global random states (:func:`hfvolume.models.state.preserved_rng`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from hfvolume.models.state import preserved_rng
from hfvolume.volume.checks import check_int

DEFAULT_DATASET_BATCH_SIZE = 8
# Keys whose tensor carries the batch dimension in a Hugging Face batch; preferred over the dict's first tensor,
# which could be a per-batch scalar or a label vector.
INPUT_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


# ---------------------------------------------------------------------------------------------- the one walker
def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def walk(batch: Any) -> Iterator[Any]:
    """Every node of a nested batch, depth first, parents before their children (pre-order), in iteration order."""
    yield batch
    if isinstance(batch, Mapping):
        children: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        children = batch
    else:
        return
    for child in children:
        yield from walk(child)


def map_batch(
    fn: Callable[..., Any],
    batch: Any,
    *like: Any,
    depth: int | None = None,
    leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Rebuild a nested batch with ``fn`` applied to its leaves (see the module docstring for the containers).

    Args:
        fn: called as ``fn(node, *like_nodes)`` on every leaf; its result replaces the leaf.
        batch: the structure to rebuild.
        like: structures of the same shape as ``batch`` (e.g. vmap ``in_dims``), walked in step with it; their
            node at the position of each leaf of ``batch`` is passed to ``fn``.
        depth: containers deeper than this are leaves (``depth=1``: only the top-level entries are visited, a
            nested value is handed to ``fn`` whole); None for no limit.
        leaf: nodes for which this returns True are leaves even if they are containers.
    """
    if depth != 0 and not (leaf is not None and leaf(batch)):
        inner = None if depth is None else depth - 1

        def rebuild(node: Any, *others: Any) -> Any:
            return map_batch(fn, node, *others, depth=inner, leaf=leaf)

        if isinstance(batch, Mapping):
            return {k: rebuild(v, *(o[k] for o in like)) for k, v in batch.items()}
        if _is_namedtuple(batch):
            return type(batch)(*(rebuild(*nodes) for nodes in zip(batch, *like)))
        if isinstance(batch, (list, tuple)):
            return type(batch)(rebuild(*nodes) for nodes in zip(batch, *like))
    return fn(batch, *like)


def to_device(batch: Any, device: torch.device, *, depth: int | None = None) -> Any:
    """``batch`` with every tensor (down to ``depth``, see :func:`map_batch`) moved to ``device`` (``Tensor.to``: no
    copy when it is already there)."""
    return map_batch(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch, depth=depth)


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The tensor whose leading dimension is the batch's number of examples, or None if there is none.

    The first tensor with at least one dimension in :func:`walk` order, except that in every mapping the entries
    named in :data:`INPUT_KEYS` are looked at before the mapping's other values.
    """
    for node in walk(batch):
        if isinstance(node, torch.Tensor) and node.ndim > 0:
            return node
        if isinstance(node, Mapping):
            for key in INPUT_KEYS:
                value = node.get(key)
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    return value
    return None


def take_first(batch: Any, n: int, full: int) -> Any:
    """The first ``n`` examples of a batch of ``full``: slices every tensor whose leading size is ``full``, and every
    plain list/tuple of ``full`` non-tensor entries (e.g. one string per example)."""

    def per_example_list(node: Any) -> bool:
        return (
            isinstance(node, (list, tuple))
            and len(node) == full
            and not any(isinstance(v, torch.Tensor) for v in node)
        )

    def cut(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return node[:n] if node.ndim > 0 and node.shape[0] == full else node
        if per_example_list(node) and type(node) in (list, tuple):
            return type(node)(node[:n])
        return node

    return map_batch(cut, batch, leaf=per_example_list)


def split_batch(batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model call for a batch: a mapping is passed as keyword arguments, a tuple/list
    positionally, a tensor as the single positional argument."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise TypeError(f"a batch must be a dict, a tuple/list or a tensor, got {type(batch).__name__}")


# ---------------------------------------------------------------------------------------------- materialising
def _hf_dataset_format(data: Any) -> str | None | bool:
    """False if ``data`` is not a 🤗 ``datasets`` dataset, else its format type (None when unformatted)."""
    mod = type(data).__module__ or ""
    if not mod.startswith("datasets"):
        return False
    fmt = getattr(data, "format", None)
    if isinstance(fmt, Mapping):
        return fmt.get("type")
    formatting = getattr(data, "_formatting", None)
    return getattr(formatting, "format_type", None)


def batch_source(data: Any, batch_size: int | None, collate_fn: Callable | None) -> Iterable[Any]:
    """An iterable of batches for any accepted ``data``: a DataLoader or iterable of ready batches (used as is), a
    dataset of examples (a 🤗 ``datasets`` or torch ``Dataset``, batched here in order), or one batch (a mapping or
    a tensor)."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    fmt = _hf_dataset_format(data)
    is_example_dataset = fmt is not False or (
        isinstance(data, (Dataset, IterableDataset)) and not isinstance(data, DataLoader)
    )
    if is_example_dataset:
        if fmt is not False and collate_fn is None and fmt not in ("torch", "pt"):
            raise ValueError(
                "a datasets.Dataset needs collate_fn= (e.g. a DataCollatorWithPadding) or must yield tensors "
                "(dataset.with_format('torch'))"
            )
        bs = DEFAULT_DATASET_BATCH_SIZE if batch_size is None else check_int("batch_size", batch_size)
        # shuffle=False: the evaluated data must not depend on the RNG.
        return DataLoader(data, batch_size=bs, shuffle=False, collate_fn=collate_fn)
    if batch_size is not None or collate_fn is not None:
        raise ValueError(
            "batch_size= and collate_fn= only apply when data is a dataset of examples; "
            f"{type(data).__name__} is used as an iterable of ready batches"
        )
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]  # a single batch given directly
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader, an iterable of batches or a dataset, got {type(data).__name__}")
    return data


def materialize_batches(
    data: Any,
    device: torch.device,
    *,
    max_batches: int | None = None,
    max_examples: int | None = None,
    batch_size: int | None = None,
    collate_fn: Callable | None = None,
) -> tuple[list[Any], bool]:
    """Iterate ``data`` once and return (batches moved to ``device``, whether the last batch was truncated).

    Iteration happens inside :func:`~hfvolume.models.state.preserved_rng` for the CPU generator only (torch's CPU
    generator, Python's ``random`` and numpy's global state are restored): a shuffling DataLoader draws from the
    global torch RNG, and the caller's RNG (e.g. the Trainer's, which it checkpoints) must not move. With
    ``max_examples`` the last batch is cut to fit exactly.
    """
    source = batch_source(data, batch_size, collate_fn)
    batches: list[Any] = []
    truncated = False
    seen = 0
    with preserved_rng(cuda_devices=[]):
        iterator = iter(source)
        while True:
            # Check the limits before drawing: a DataLoader's next batch may do real work (workers, RNG).
            if max_batches is not None and len(batches) >= max_batches:
                break
            if max_examples is not None and seen >= max_examples:
                break
            try:
                batch = next(iterator)
            except StopIteration:
                break
            lead = first_tensor(batch)
            if lead is None:
                raise ValueError(f"batch {len(batches)} ({type(batch).__name__}) contains no tensor with a batch dim")
            n = int(lead.shape[0])
            if max_examples is not None and seen + n > max_examples:
                batch = take_first(batch, max_examples - seen, n)
                n, truncated = max_examples - seen, True
            batches.append(to_device(batch, device))
            seen += n
    if not batches:
        raise ValueError("data is empty: no batch to evaluate the behaviour on")
    return batches, truncated


def examples_in(batch: Any) -> int:
    """Number of examples of a materialised batch: the leading size of its :func:`first_tensor`."""
    lead = first_tensor(batch)
    if lead is None:
        raise ValueError(f"a {type(batch).__name__} batch contains no tensor with a batch dim")
    return int(lead.shape[0])


__all__ = [
    "DEFAULT_DATASET_BATCH_SIZE",
    "INPUT_KEYS",
    "batch_source",
    "examples_in",
    "first_tensor",
    "map_batch",
    "materialize_batches",
    "split_batch",
    "take_first",
    "to_device",
    "walk",
]
