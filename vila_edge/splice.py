"""Splice media features into the text embeddings (reference doc §5.4 HEAD, §5.5 V15).

Works on numpy arrays (runtime) and torch tensors (PyTorch reference) alike: the walk is the same,
only the concatenation differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vila_edge.errors import PromptError


def _cat(parts):
    first = parts[0]
    if type(first).__module__.startswith("torch"):
        import torch

        return torch.cat(parts, dim=0)
    import numpy as np

    return np.concatenate(parts, axis=0)


def splice(
    ids: Sequence[int],
    embed: Callable[[list[int]], object],
    media: Sequence[object],
    *,
    media_ids: set[int],
    end_ids: Sequence[int] = (),
):
    """Walk `ids`; a text span becomes `embed(span)`, each media id consumes the next media item
    (`[n_i, D]` features) followed by `embed(end_ids)` (HEAD's end token "\\n"; empty for V15).

    Raises PromptError when the number of media markers and media items differ.
    """
    n_marks = sum(1 for t in ids if t in media_ids)
    if n_marks != len(media):
        raise PromptError(f"the prompt has {n_marks} media marker(s) but {len(media)} media item(s) were given")
    parts = []
    end = embed(list(end_ids)) if end_ids else None
    it = iter(media)
    span: list[int] = []
    for t in ids:
        if t in media_ids:
            if span:
                parts.append(embed(span))
                span = []
            parts.append(next(it))
            if end is not None:
                parts.append(end)
        else:
            span.append(t)
    if span:
        parts.append(embed(span))
    return _cat(parts)


def spliced_length(ids: Sequence[int], media_lengths: Sequence[int], *, media_ids: set[int], n_end: int = 0) -> int:
    """Sequence length after splicing, without computing it (for context checks and planning)."""
    n_text = sum(1 for t in ids if t not in media_ids)
    return n_text + sum(media_lengths) + n_end * len(media_lengths)
