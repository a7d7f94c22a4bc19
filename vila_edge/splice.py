"""A prompt as a typed chunk sequence, and the splice of media features into the text embeddings
(reference doc §5.4 HEAD, §5.5 V15).

`prompt_chunks(ids, media, ...)` cuts a tokenized prompt (media markers in place) into `TextChunk`s and
`MediaChunk`s, each knowing its first position and how many it takes, as llama.cpp's mtmd chunks do.
The sequence is the one answer to three questions: the spliced embeddings (`embeds`), the token id of
every position (`position_ids`, -1 for media rows: what TensorRT-LLM is fed) and the number of
positions (`n_positions`: context checks, the server's token count). A media item is its features
([n, D] numpy array or torch tensor), or just its row count when only positions are needed.

Works on numpy arrays (runtime) and torch tensors (PyTorch reference) alike: the walk is the same,
only the concatenation differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

from vila_edge.errors import PromptError


@dataclass(frozen=True)
class TextChunk:
    """Token ids embedded from the table, at positions start .. start + len(ids) - 1."""

    ids: tuple[int, ...]
    start: int

    @property
    def n_positions(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class MediaChunk:
    """One media item: `n_rows` feature rows, then the end tokens that close it (HEAD's "\\n"; none for V15)."""

    n_rows: int
    end_ids: tuple[int, ...]
    start: int
    features: object = None  # [n_rows, D]; None when only the positions are known (token counting)

    @property
    def n_positions(self) -> int:
        return self.n_rows + len(self.end_ids)


Chunk = TextChunk | MediaChunk


@dataclass(frozen=True)
class PromptChunks:
    chunks: tuple[Chunk, ...]

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def n_positions(self) -> int:
        return sum(c.n_positions for c in self.chunks)

    @property
    def media(self) -> list[MediaChunk]:
        return [c for c in self.chunks if isinstance(c, MediaChunk)]

    def position_ids(self) -> list[int]:
        """Token id of every position (-1 for media feature rows), in order."""
        out: list[int] = []
        for c in self.chunks:
            out += list(c.ids) if isinstance(c, TextChunk) else [-1] * c.n_rows + list(c.end_ids)
        return out

    def after(self, n: int) -> PromptChunks:
        """The chunks of positions n.. (what is left to prefill when a cache already holds the first n);
        n must not fall inside a media item's rows."""
        out: list[Chunk] = []
        for c in self.chunks:
            end = c.start + c.n_positions
            if end <= n:
                continue
            if c.start >= n:
                out.append(c)
            elif isinstance(c, TextChunk):
                out.append(TextChunk(c.ids[n - c.start:], n))
            else:
                raise PromptError(f"cannot cut a prompt at position {n}: inside a media item ({c.start}..{end - 1})")
        return PromptChunks(tuple(out))

    def media_start_before(self, n: int) -> int:
        """`n`, or the first position of the media item whose positions contain it (a cut that `after` takes)."""
        for c in self.chunks:
            if isinstance(c, MediaChunk) and c.start < n < c.start + c.n_positions:
                return c.start
        return n

    def embeds(self, embed: Callable[[list[int]], object]):
        """The spliced input embeddings [n_positions, D]: text from `embed(ids)`, media rows as given."""
        parts = []
        ends: dict[tuple[int, ...], object] = {}  # each distinct end sequence embedded once
        for c in self.chunks:
            if isinstance(c, TextChunk):
                parts.append(embed(list(c.ids)))
                continue
            if c.features is None:
                raise PromptError("a media chunk without features cannot be embedded (it was built from lengths)")
            parts.append(c.features)
            if c.end_ids:
                if c.end_ids not in ends:
                    ends[c.end_ids] = embed(list(c.end_ids))
                parts.append(ends[c.end_ids])
        return _cat(parts)


def prompt_chunks(ids: Sequence[int], media: Sequence[object], *, media_ids: set[int],
                  end_ids: Sequence[int] = ()) -> PromptChunks:
    """Cut `ids` at its media markers; each marker takes the next media item (features, or a row count).

    Raises PromptError when the number of media markers and media items differ.
    """
    n_marks = sum(1 for t in ids if t in media_ids)
    if n_marks != len(media):
        raise PromptError(f"the prompt has {n_marks} media marker(s) but {len(media)} media item(s) were given")
    end = tuple(int(t) for t in end_ids)
    chunks: list[Chunk] = []
    pos = 0
    span: list[int] = []
    it = iter(media)

    def close_span():
        nonlocal pos, span
        if span:
            chunks.append(TextChunk(tuple(span), pos))
            pos += len(span)
            span = []

    for t in ids:
        if t not in media_ids:
            span.append(int(t))
            continue
        close_span()
        item = next(it)
        if isinstance(item, Integral):  # a row count: positions only
            chunk = MediaChunk(int(item), end, pos)
        else:
            chunk = MediaChunk(len(item), end, pos, item)
        chunks.append(chunk)
        pos += chunk.n_positions
    close_span()
    return PromptChunks(tuple(chunks))


def shared_positions(a: PromptChunks, b: PromptChunks) -> int:
    """How many first positions `a` and `b` have in common: the same token ids, and the same media items
    (whole items with equal features: a cache holding `a` can serve these positions of `b`)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if isinstance(x, TextChunk) and isinstance(y, TextChunk):
            k = 0
            while k < len(x.ids) and k < len(y.ids) and x.ids[k] == y.ids[k]:
                k += 1
            n += k
            if k < len(x.ids) or k < len(y.ids):
                return n
        elif isinstance(x, MediaChunk) and isinstance(y, MediaChunk) and _same_media(x, y):
            n += x.n_positions
        else:
            return n
    return n


def _same_media(x: MediaChunk, y: MediaChunk) -> bool:
    if x.n_rows != y.n_rows or x.end_ids != y.end_ids or x.features is None or y.features is None:
        return False
    if x.features is y.features:  # the vision cache hands out the very same arrays
        return True
    import numpy as np

    return bool(np.array_equal(np.asarray(x.features), np.asarray(y.features)))


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
    return prompt_chunks(ids, media, media_ids=media_ids, end_ids=end_ids).embeds(embed)
