"""The inference pipeline: media -> preprocess -> vision engine -> merge -> projector -> splice -> LLM.

    pipe = vila_edge.load("engines/NVILA-Lite-2B")
    for text in pipe.generate("Describe the image.", images=["cat.jpg"], stream=True):
        print(text, end="", flush=True)
    result = pipe.generate("What is in the video?", video="clip.mp4")   # -> GenerationResult
    chat = pipe.chat(); chat.ask("Hi", images=["a.png"]); chat.ask("And now?")   # KV cache kept

Media layout per family follows the PyTorch reference (`vila_edge.reference.model`) exactly; the
checkpoint's tiling scheme (`vila_edge.media.tiling`) cuts the tiles and says how their features merge:
- one image of a `dynamic` (NVILA-Lite) checkpoint: one media item per tile;
- one image of a `dynamic_s2` (NVILA) checkpoint: per-scale tile features merged (numpy, or the CUDA
  kernel of `vila_edge.kernels` when the vision engine runs on a GPU), projected per 32x32 chunk, then
  re-merged row-major over the global grid;
- several images in one message of a dynamic family: one plain tile per image;
- static S2: scales merged into one chunk; otherwise one item per image;
- video: `num_video_frames` frames (vila_edge.media.video); VILA1.5: each frame an image; NVILA:
  one `<vila/video>` item of per-frame features each followed by the end token, TSP-pooled when the
  checkpoint's video encoder sets pool sizes.
The splice (V15 `-200` placeholder vs HEAD media tokens + end tokens) follows `config.splice`.

Each call yields text as it is generated (incremental detokenization, never half a UTF-8 character)
and records per-stage timings: preprocess, vision, merge+projector, prefill, decode.

The prompt goes to the LLM as a `PromptChunks` (vila_edge.splice: text ids and media items, each knowing
its positions); the loop is `vila_edge.generate`'s (prefill, decode_one_token, generate_tokens);
`Conversation` keeps the conversation's bookkeeping (history, KV prefix reuse, context fitting, rollback)
and holds the LLM's cache through the pipeline's `KVCache`. The pipeline's `VisionCache`
(vila_edge.vision_cache) keeps recent images' media items, so an image seen again is not re-encoded.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vila_edge.backends.base import ContextOverflow, LLMEngine, VisionEngine
from vila_edge.config import VilaConfig
from vila_edge.engine_dir import TOKENIZER_DIR, read_manifest
from vila_edge.errors import EngineError, MediaError, PromptError, VilaEdgeError
from vila_edge.generate import (
    Answer,
    DraftBudget,
    DraftStats,
    KVCache,
    PromptLookup,
    Sampler,
    SamplingParams,
    TokenEvent,
    can_speculate,
    decode_one_token,
    generate_tokens,
    prefill,
    speculative_tokens,
)
from vila_edge.heap import large_blocks_from_mmap
from vila_edge.media.image import as_image_list, load_image
from vila_edge.media.tiling import Tiles, TilingScheme, tiling_scheme
from vila_edge.prompt import IMAGE_PLACEHOLDER, Message, check_text, render, tokenize, user_content
from vila_edge.splice import PromptChunks, prompt_chunks, shared_positions
from vila_edge.tokenizer import SENTINEL_TOKEN, Tokenizer
from vila_edge.vision_cache import VisionCache, engine_identity, pixel_key

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Timings:
    preprocess: float = 0.0  # decode + tile + normalize (s)
    vision: float = 0.0  # vision tower
    merge_projector: float = 0.0  # S2 merge + projector + re-merge + TSP pooling
    prefill: float = 0.0
    decode: float = 0.0
    ttft: float = 0.0  # call start -> first token chosen
    prompt_positions: int = 0  # positions of the conversation in the cache after the prefill
    prefill_positions: int = 0  # positions this call prefilled (less than prompt_positions with KV reuse)
    generated_tokens: int = 0
    media_items: int = 0
    tiles: int = 0
    drafted_tokens: int = 0  # prompt lookup (SamplingParams.prompt_lookup): tokens drafted and verified
    accepted_tokens: int = 0  # of which were right (each one saved a decoder run)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(0, self.generated_tokens - 1)
        return steps / self.decode if self.decode > 0 and steps else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_positions / self.prefill if self.prefill > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        d["prefill_tokens_per_s"] = round(self.prefill_tokens_per_s, 3)
        return d


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, the stop token included when one ended the answer
    finish_reason: str  # "stop" (stop token / string), "length" (max_new_tokens), "context" (cache full), "interrupted"
    timings: Timings
    notices: list[str] = field(default_factory=list)  # e.g. "context full: dropped the 2 oldest turns"

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "timings": self.timings.as_dict(), "notices": self.notices}


@dataclass
class PrefillCounts:
    """Over a pipeline's life: prompt positions the answers needed, and how many were prefilled (the rest
    came from the KV cache: a chat's earlier turns, or the shared start of a resent conversation)."""

    prompt_positions: int = 0
    prefilled_positions: int = 0

    def add(self, timings: Timings) -> None:
        self.prompt_positions += timings.prompt_positions
        self.prefilled_positions += timings.prefill_positions

    def as_dict(self) -> dict:
        return {"prompt_positions": self.prompt_positions, "prefilled_positions": self.prefilled_positions,
                "reused_positions": self.prompt_positions - self.prefilled_positions}


class TextStream:
    """Iterator over the text pieces of one answer; `.result` is set once it is exhausted."""

    def __init__(self, events: Iterator[TokenEvent]):
        self._events = events
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        gen = self._events
        try:
            while True:
                ev = next(gen)
                if ev.text:
                    yield ev.text
        except StopIteration as stop:
            self.result = stop.value

    def close(self) -> None:
        self._events.close()


@dataclass(frozen=True)
class EncodedMessage:
    """A user message with its media already through the vision path (`Pipeline.encode_message`)."""

    message: Message
    items: list[np.ndarray]
    timings: Timings  # preprocess / vision / merge+projector of the encoding


@dataclass
class Turn:
    """A message of a conversation given to `Pipeline.generate` as history."""

    role: str  # "user" | "assistant"
    text: str
    images: Sequence = ()
    video: object = None


# ---------------------------------------------------------------------------------------------
# Media
# ---------------------------------------------------------------------------------------------


def tsp_pool(frames: np.ndarray, pool_sizes) -> list[np.ndarray]:
    """TSPVideoEncoder on projected features [T, N, D] -> per pool size [T/pt, (nl/ph)(nl/pw), D]."""
    t, n, d = frames.shape
    nl = math.isqrt(n)
    if nl * nl != n:
        raise MediaError(f"temporal pooling needs a square token grid per frame, got {n} tokens")
    out = []
    for pt, ph, pw in pool_sizes:
        if t % pt or nl % ph or nl % pw:
            raise MediaError(f"temporal pooling {pt}x{ph}x{pw} needs frames ({t}) divisible by {pt} and a "
                             f"{nl}x{nl} grid divisible by {ph}x{pw}; set num_video_frames to a multiple of {pt}")
        x = frames.reshape(t, nl, nl, d)
        x = x.reshape(t // pt, pt, nl, nl, d).mean(1)
        x = x.reshape(t // pt, nl // ph, ph, nl, d).mean(2)
        x = x.reshape(t // pt, nl // ph, nl // pw, pw, d).mean(3)
        out.append(x.reshape(t // pt, -1, d).astype(np.float32))
    return out


def _to_frame_images(video, cfg: VilaConfig, *, max_frames: int | None = None) -> list:
    from PIL import Image

    if isinstance(video, (str, Path)):
        from vila_edge.media.video import load_video

        return load_video(video, cfg, num_frames=max_frames)
    frames = list(video)
    out = []
    for k, f in enumerate(frames):
        out.append(f if isinstance(f, Image.Image) else load_image(f, name=f"video frame {k}"))
    if not out:
        raise MediaError("video: no frames")
    return out


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


def _budget_closed_is_length(tokens: Iterator[tuple[int, str | None]], constraint):
    """A JSON answer the token budget made us close early (structured.CLOSE_LOOKAHEAD) is complete JSON, but it
    ended for lack of tokens: its finish is "length", as when the budget cuts plain text."""
    for token, finish in tokens:
        yield token, ("length" if finish == "complete" and constraint.closed_early else finish)


class Pipeline:
    def __init__(self, config: VilaConfig, tokenizer: Tokenizer, vision: VisionEngine, llm: LLMEngine, *,
                 engine_dir: Path | None = None, manifest: dict | None = None,
                 vision_cache: VisionCache | None = None, prefix_reuse: bool = True):
        self.config = config
        self.tokenizer = tokenizer
        self.vision = vision
        self.llm = llm
        self.engine_dir = engine_dir
        self.manifest = manifest or {}
        self.max_context = min(llm.max_context, config.llm.max_length)
        self.kv = KVCache(llm)  # which Conversation's tokens are in the LLM's cache
        self.vision_cache = vision_cache if vision_cache is not None else VisionCache()  # shared by chat, API, serve
        self.prefill_counts = PrefillCounts()
        # prompt lookup: what verifying k drafts costs on this engine, timed across answers
        self.draft_budget = DraftBudget()
        self.prefix_reuse = prefix_reuse  # a new prompt keeps the start it shares with the KV cache's holder
        self._gpu_merge = None
        if getattr(vision, "on_gpu", False):
            try:
                from vila_edge import kernels

                self._gpu_merge = kernels
            except Exception:  # noqa: BLE001 - no CUDA toolchain / cuda-python: numpy merge
                self._gpu_merge = None
        self._engine_identity = engine_identity(self.manifest, self._vision_description())

    # ---- media ids -------------------------------------------------------------------------
    @property
    def media_ids(self) -> set[int]:
        if self.config.splice == "v15":
            return {IMAGE_PLACEHOLDER}
        return set(self.config.llm.media_token_ids.values())

    @property
    def end_ids(self) -> tuple[int, ...]:
        return tuple(self.config.llm.end_token_ids) if self.config.splice == "head" else ()

    def embed(self, ids) -> np.ndarray:
        return self.llm.embed(ids)

    # ---- prompts ---------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """A whole conversation rendered with the checkpoint's chat template and tokenized (media markers in place)."""
        tok = self.tokenizer
        text = render(self.config.llm.chat_format, messages, tok, add_generation_prompt=add_generation_prompt)
        return tokenize(self.config, tok, text, first=True, messages=messages)

    def prompt_chunks(self, ids: Sequence[int], media: Sequence) -> PromptChunks:
        """`ids` cut at its media markers; `media`: each marker's features [n, D], or only its row count."""
        return prompt_chunks(ids, media, media_ids=self.media_ids, end_ids=self.end_ids)

    def decode_tokens(self, logits: np.ndarray, params: SamplingParams, *,
                      has_room: Callable[[], bool] | None = None, history: Sequence[int] = (),
                      stats: DraftStats | None = None, max_context: int | None = None,
                      ) -> Iterator[tuple[int, str | None]]:
        """The generation loop of this model: its sampler, its stop tokens, this LLM's decode step.
        `history`: the conversation's token ids so far, where prompt lookup drafts from (params.prompt_lookup);
        `stats` counts its drafts; `max_context` replaces `has_room` there (the cache runs ahead of the
        answer while drafts are confirmed)."""
        cfg = self.config.llm
        stops = set() if params.ignore_eos else set(cfg.stop_token_ids)
        if can_speculate(self.llm, params):
            sampler = Sampler(params, cfg.vocab_size, cfg.extra_masked_ids)
            return speculative_tokens(logits, self.llm, sampler, PromptLookup(params.prompt_lookup), history,
                                      max_new_tokens=params.max_new_tokens, stop_ids=stops, stats=stats,
                                      max_context=max_context, budget=self.draft_budget)
        constraint = None
        if params.json_schema is not None:
            from vila_edge.structured import JsonConstraint

            constraint = JsonConstraint(params.json_schema, self.tokenizer, sorted(stops))
        sampler = Sampler(params, cfg.vocab_size, cfg.extra_masked_ids, constraint=constraint)
        tokens = generate_tokens(logits, functools.partial(decode_one_token, self.llm), sampler,
                                 max_new_tokens=params.max_new_tokens, stop_ids=stops, has_room=has_room,
                                 complete=constraint.complete if constraint is not None else None)
        return tokens if constraint is None else _budget_closed_is_length(tokens, constraint)

    # ---- vision path -----------------------------------------------------------------------
    @property
    def tiling(self) -> TilingScheme:
        """The checkpoint's tiling scheme: tiles, merge before and re-merge after the projector."""
        return tiling_scheme(self.config.vision)

    def _device_merge(self, tiles: Tiles) -> np.ndarray | None:
        fn = getattr(self.vision, "merge_on_device", None)
        spec = self.tiling.merge_spec(tiles)
        if self._gpu_merge is None or fn is None or spec is None:
            return None
        try:
            return fn(tiles.pixels, self._gpu_merge, spec.kwargs())
        except Exception:  # noqa: BLE001 - no usable kernel on this GPU: numpy merge from now on
            self._gpu_merge = None
            return None

    def image_key(self, pil, *, single: bool) -> bytes:
        """The vision cache's key of a decoded image: its pixels, this engine, and the call's switches."""
        merge = "cuda" if self._gpu_merge is not None else "numpy"
        return pixel_key(pil, self._engine_identity + f"|single={single}|merge={merge}|".encode())

    def image_items(self, image, *, single: bool = True, timings: Timings | None = None,
                    cache: bool = True) -> list[np.ndarray]:
        """Media items ([n_i, D] float32) of one image, as the reference's `image_items`; from the vision
        cache when these pixels were encoded before (the items are then read-only arrays). `cache=False`:
        neither looked up nor kept (live frames: each one new, caching them would only fill the bound)."""
        t = timings or Timings()
        t0 = time.perf_counter()
        pil = load_image(image)
        store = self.vision_cache
        use = cache and store.enabled
        key = self.image_key(pil, single=single) if use else b""
        hit = store.get(key) if use else None
        if hit is not None:
            t.preprocess += time.perf_counter() - t0
            t.tiles += hit.tiles
            t.media_items += len(hit.items)
            return list(hit.items)
        tiles = self.tiling.tiles(pil, single=single)
        t1 = time.perf_counter()
        y = None if self.config.vision.tower == "ps3" else self._device_merge(tiles)
        if self.config.vision.tower == "ps3":  # one image -> one item (low-res + selected high-res tokens)
            items = [self.vision.item(tiles.pixels)]
            t2 = time.perf_counter()
        elif y is not None:  # tower + CUDA merge + projector on the GPU: reported under "vision"
            t2 = time.perf_counter()
            items = self.tiling.after_projector(y, tiles)
        else:
            feats = self.vision.encode(tiles.pixels)
            t2 = time.perf_counter()
            items = self.tiling.after_projector(self.vision.project(self.tiling.merge(feats, tiles)), tiles)
        t3 = time.perf_counter()
        t.preprocess += t1 - t0
        t.vision += t2 - t1
        t.merge_projector += t3 - t2
        t.tiles += tiles.pixels.shape[0]
        t.media_items += len(items)
        kept = store.put(key, items, tiles.pixels.shape[0]) if use else None
        return list(kept.items) if kept is not None else items

    def video_items(self, video, *, timings: Timings | None = None) -> tuple[list[np.ndarray], int]:
        """(media items, number of frames) of a video (path, frame folder, or a list of frames)."""
        cfg = self.config
        t = timings or Timings()
        t0 = time.perf_counter()
        frames = _to_frame_images(video, cfg)
        t.preprocess += time.perf_counter() - t0
        if cfg.splice == "v15":  # VILA1.5: every frame is an ordinary image
            items = []
            for f in frames:
                items += self.image_items(f, single=False, timings=t)
            return items, len(frames)
        if cfg.vision.video_max_tiles > 1:
            raise MediaError(f"video_max_tiles={cfg.vision.video_max_tiles}: tiled video frames are not supported; "
                             f"set video_max_tiles to 1 in the checkpoint's config.json")
        t0 = time.perf_counter()
        tiles = [self.tiling.tiles(f, single=False) for f in frames]
        pixels = np.concatenate([x.pixels for x in tiles], axis=0)
        t1 = time.perf_counter()
        feats = self.vision.encode(pixels)
        t2 = time.perf_counter()
        per = feats.shape[0] // len(frames)
        x = np.concatenate([self.tiling.merge(feats[k * per:(k + 1) * per], tiles[k]) for k in range(len(frames))],
                           axis=0)
        y = self.vision.project(x)  # [T, n, D]
        groups = tsp_pool(y, cfg.video_pool_sizes) if cfg.video_pool_sizes else [y]
        end = self.embed(self.end_ids) if self.end_ids else np.zeros((0, y.shape[-1]), np.float32)
        parts = []
        for g in groups:
            for f in g:
                parts += [f, end]
        item = np.concatenate(parts[:-1], axis=0)  # the splice appends the last end token
        t3 = time.perf_counter()
        t.preprocess += t1 - t0
        t.vision += t2 - t1
        t.merge_projector += t3 - t2
        t.tiles += pixels.shape[0]
        t.media_items += 1
        return [item], len(frames)

    def user_message(self, text: str, images: Sequence = (), video=None,
                     timings: Timings | None = None, cache: bool = True) -> tuple[Message, list[np.ndarray]]:
        """A user message with its media markers, and its media items in marker order."""
        t = timings if timings is not None else Timings()
        text = check_text(text)
        images = as_image_list(images)
        single = len(images) == 1
        items: list[np.ndarray] = []
        n_tiles = None
        for im in images:
            its = self.image_items(im, single=single, timings=t, cache=cache)
            if single:
                n_tiles = len(its)
            items += its
        n_frames = 0
        if video is not None:
            vitems, n_frames = self.video_items(video, timings=t)
            items += vitems
        content = user_content(self.config, text, n_images=len(images), n_tiles=n_tiles,
                               video=video is not None, n_frames=n_frames)
        return Message("user", content), items

    def encode_message(self, text: str, images: Sequence = (), video=None, *, cache: bool = True) -> EncodedMessage:
        """The vision half of a turn, done ahead of time: `Conversation.ask(..., encoded=)` runs only the LLM half.
        Touches only the vision engine, so it can run in another thread while the LLM decodes (the live
        captioner's pipelining)."""
        t = Timings()
        user, items = self.user_message(text, images, video, timings=t, cache=cache)
        return EncodedMessage(user, items, t)

    # ---- API -------------------------------------------------------------------------------
    def chat(self, *, reuse_kv: bool = True, on_notice: Callable[[str], None] | None = None) -> Conversation:
        return Conversation(self, reuse_kv=reuse_kv, on_notice=on_notice)

    def generate(self, prompt: str | Sequence[Turn], images: Sequence | None = None, video=None, *,
                 stream: bool = False, params: SamplingParams | None = None,
                 **sampling) -> GenerationResult | TextStream:
        """Answer one prompt (or the last user turn of a conversation given as a list of Turns).
        Sampling: `params`, or SamplingParams' fields as keywords (max_new_tokens=, temperature=, stop=, ...;
        ``ignore_eos`` generates through the checkpoint's stop tokens: exactly max_new_tokens, for benchmarks)."""
        s = TextStream(self.generate_events(prompt, images, video, params=params or SamplingParams(**sampling)))
        if stream:
            return s
        for _ in s:
            pass
        return s.result

    def generate_events(self, prompt: str | Sequence[Turn], images: Sequence | None = None, video=None, *,
                        params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """One TokenEvent per generated token (what servers count); returns the GenerationResult."""
        conv = Conversation(self)
        if isinstance(prompt, str):
            text, imgs, vid = prompt, as_image_list(images), video
        else:
            turns = _check_turns(prompt)
            conv.add_history(turns[:-1])
            text, imgs, vid = turns[-1].text, as_image_list(turns[-1].images) + as_image_list(images), (
                turns[-1].video if turns[-1].video is not None else video)
        check_text(text)  # here, not at the first streamed token
        return conv.ask_events(text, images=imgs, video=vid, params=params or SamplingParams())

    def prompt_embeds(self, prompt: str, images: Sequence | None = None, video=None) -> np.ndarray:
        """The spliced input embeddings [L, D] of a one-turn prompt (what the LLM is prefilled with)."""
        user, items = self.user_message(prompt, images or (), video)
        return self.prompt_chunks(self.prompt_ids([user]), items).embeds(self.embed)

    def first_token_logits(self, prompt: str, images: Sequence | None = None, video=None) -> np.ndarray:
        """Logits of the first answer token, masked like the sampler sees them (debugging, parity checks).
        Resets the LLM's cache."""
        from vila_edge.generate import mask_logits

        embeds = self.prompt_embeds(prompt, images, video)
        self.llm.reset()
        self.kv.release()
        logits = self.llm.forward(embeds)
        self.llm.reset()
        return mask_logits(logits, self.config.llm.vocab_size, self.config.llm.extra_masked_ids)

    def count_positions(self, prompt: str | Sequence[Turn], images: Sequence | None = None, video=None) -> int:
        """LLM positions the prompt occupies (media included); runs the vision path."""
        conv = Conversation(self)
        conv.add_history([Turn("user", prompt, images or (), video)] if isinstance(prompt, str) else list(prompt))
        return self.prompt_chunks(self.prompt_ids(conv.messages), conv.media()).n_positions

    def _vision_description(self) -> dict:
        return getattr(self.vision, "describe", lambda: {"backend": self.vision.name})()

    def describe(self) -> dict:
        d = {"family": self.config.family, "max_context": self.max_context,
             "vision": self._vision_description(),
             "llm": getattr(self.llm, "describe", lambda: {"backend": self.llm.name})(),
             "merge": "cuda kernel" if self._gpu_merge is not None else "numpy"}
        if self.engine_dir is not None:
            d["engine_dir"] = str(self.engine_dir)
        return d

    def stats(self) -> dict:
        """Counts of the caches: the vision cache's hits/misses/evictions/bytes, positions prefilled vs reused."""
        return {"vision_cache": self.vision_cache.stats(), "prefill": self.prefill_counts.as_dict()}

    def close(self) -> None:
        self.vision.close()
        self.llm.close()


# ---------------------------------------------------------------------------------------------
# Conversation (multi-turn, KV cache kept between turns)
# ---------------------------------------------------------------------------------------------


class Conversation:
    """A chat whose KV cache stays in the LLM engine between turns: the conversation's bookkeeping.

    The cache holds exactly `segments` (token ids with media markers + their media items): the first
    prompt, each answer's tokens, and each later turn's continuation (the text that closes the previous
    answer and opens the new turn, tokenized as it would be inside the whole conversation). A new turn
    prefills only its continuation, when the pipeline's `KVCache` says the cache still holds this
    conversation. `reuse_kv=False` re-prefills all segments every turn (same tokens, used to check the
    reuse). A prompt prefilled from scratch (the first turn, a `generate` call, a server request resending its
    conversation) keeps the longest start it shares with whatever conversation the cache holds, and prefills
    only the rest (`_take_cache`; off with `reuse_kv=False` or the pipeline's `prefix_reuse=False`). When a
    turn does not fit, the oldest turns are dropped, the remaining conversation is re-rendered and
    re-prefilled, and a notice says so. An answer cut short (closed event stream) is
    kept, and the cache rolled back to it. The generation itself is the loop of `vila_edge.generate`.
    """

    def __init__(self, pipeline: Pipeline, *, reuse_kv: bool = True, on_notice: Callable[[str], None] | None = None):
        self.pipe = pipeline
        self.kv = pipeline.kv
        self.reuse_kv = reuse_kv
        self.on_notice = on_notice
        self.messages: list[Message] = []
        self.turn_items: list[list[np.ndarray]] = []  # media items of each user message
        self.segments: list[tuple[list[int], list[np.ndarray]]] = []
        self.pending: int | None = None  # last generated token (not yet in the cache)
        self.cache_positions = 0
        self.last: GenerationResult | None = None
        self.turns = 0

    # ---- bookkeeping -----------------------------------------------------------------------
    def reset(self) -> None:
        self.messages.clear()
        self.turn_items.clear()
        self.segments.clear()
        self.pending = None
        self.cache_positions = 0
        self.kv.clear(self)

    def media(self) -> list[np.ndarray]:
        """The media items of all user messages, in order."""
        return [x for its in self.turn_items for x in its]

    def add_history(self, turns: Sequence[Turn]) -> None:
        """Earlier turns (user / assistant, alternating) prefilled together with the next question."""
        if self.segments:
            raise PromptError("history can only be added before the first question")
        for t in turns:
            if t.role == "user":
                msg, items = self.pipe.user_message(t.text, t.images, t.video)
                self.messages.append(msg)
                self.turn_items.append(items)
            elif t.role == "assistant":
                self.messages.append(Message("assistant", t.text))
            else:
                raise PromptError(f"turn role {t.role!r}: only 'user' and 'assistant' turns are supported")

    def _notice(self, msg: str, notices: list[str]) -> None:
        notices.append(msg)
        if self.on_notice is not None:
            self.on_notice(msg)

    def _full_prompt(self, messages, items, *, add_generation_prompt=True) -> tuple[list[int], list[np.ndarray]]:
        return self.pipe.prompt_ids(messages, add_generation_prompt=add_generation_prompt), list(items)

    def _continuation(self, user: Message) -> list[int] | None:
        """Ids that follow the cached tokens for a new user turn, or None if the template does not allow
        extending the conversation as a pure suffix."""
        cfg, tok = self.pipe.config, self.pipe.tokenizer
        fmt = cfg.llm.chat_format
        if not self.messages or self.messages[-1].role != "assistant":
            return None
        hist = self.messages[:-1] + [Message("assistant", SENTINEL_TOKEN)]
        prev = render(fmt, hist, tok, add_generation_prompt=False)
        full = render(fmt, hist + [user], tok, add_generation_prompt=True)
        if SENTINEL_TOKEN not in prev or not full.startswith(prev):
            return None
        closing = prev.split(SENTINEL_TOKEN, 1)[1]
        ids = tokenize(cfg, tok, closing + full[len(prev):], first=False, messages=[user])
        if self.pending is not None and not (ids and ids[0] == self.pending):
            ids = [self.pending] + ids
        return ids

    def _fit(self, user: Message, items: list[np.ndarray], params: SamplingParams,
             notices: list[str]) -> tuple[list[int], list[np.ndarray], bool]:
        """(ids, media items) to prefill for the new turn, and whether they continue the cached conversation.
        Drops the oldest turns while the whole conversation does not fit."""
        limit = self.pipe.max_context
        new_ids = self._continuation(user) if self.segments else None
        if new_ids is not None:
            reuse = self.reuse_kv and self.kv.holds(self, self.cache_positions)
            if reuse:
                ids, its, base = new_ids, items, self.cache_positions
            else:
                ids = [i for s in self.segments for i in s[0]] + new_ids
                its, base = [x for s in self.segments for x in s[1]] + items, 0
            total = base + self.pipe.prompt_chunks(ids, its).n_positions
            if total + 1 <= limit and (total + params.max_new_tokens <= limit or len(self.messages) < 2):
                return ids, its, reuse
        # (re-)render the whole conversation, dropping the oldest turns while it does not fit
        msgs, turn_items = list(self.messages), list(self.turn_items)
        dropped = 0
        while True:
            ids, its = self._full_prompt(msgs + [user], [x for t in turn_items for x in t] + items)
            total = self.pipe.prompt_chunks(ids, its).n_positions
            if (total + params.max_new_tokens <= limit) or len(msgs) < 2:
                break
            msgs, turn_items = msgs[2:], turn_items[1:]
            dropped += 1
        if total + 1 > limit:
            raise ContextOverflow(total + 1, limit)
        if dropped:
            self._notice(f"context full ({limit} positions): dropped the {dropped} oldest turn(s) and "
                         f"re-prefilled the remaining conversation ({total} positions)", notices)
        self.messages, self.turn_items = msgs, turn_items
        return ids, its, False

    def _end_turn(self, answer: Answer, before_prefill: int, after_prefill: int) -> None:
        """Record the answer (or forget the turn when not one token came) and roll the cache back to it."""
        generated = answer.token_ids
        if generated:
            # the cache holds every generated token but the last one (an interrupt that landed inside a
            # decode step may have left one more: roll it back, or re-prefill next turn)
            self.kv.truncate(self, after_prefill + len(generated) - 1)
            self.segments.append((generated[:-1], []))
            self.pending = generated[-1]
            text = answer.text
            self.messages.append(Message("assistant", text.strip() if self.pipe.config.splice == "v15" else text))
        else:  # interrupted before the first token: forget the turn
            self.segments.pop()
            self.messages.pop()
            self.turn_items.pop()
            self.kv.truncate(self, before_prefill)
        self.cache_positions = self.kv.length
        self.turns += 1

    def cached_prompt(self) -> tuple[list[int], list[np.ndarray]]:
        """(ids, media items) of every position this conversation has put in the LLM's cache."""
        return [i for s in self.segments for i in s[0]], [x for s in self.segments for x in s[1]]

    def _take_cache(self, chunks: PromptChunks, reuse: bool) -> PromptChunks:
        """Make the LLM's cache this conversation's; what is left of `chunks` to prefill.

        `reuse`: `chunks` continue this conversation's own cached positions. Otherwise `chunks` is the whole
        prompt, and the cache keeps the longest start it has in common with what the cache holds now (the
        previous request of a server client resending its conversation, the same image and system prompt
        asked again): the same tokens and media items at the same positions give the same keys and values,
        so only the rest is prefilled. The rest of the cache is rolled back."""
        if reuse:
            self.kv.take(self, keep=True)
            return chunks
        n = self._shared_with_cache(chunks) if self.reuse_kv and self.pipe.prefix_reuse else 0
        self.kv.take(self, keep=n > 0)
        return chunks.after(n) if n else chunks

    def _shared_with_cache(self, chunks: PromptChunks) -> int:
        """Positions at the start of `chunks` the cache already holds (rolled back to them), or 0."""
        holder = self.kv.holder
        if not isinstance(holder, Conversation) or not self.kv.holds(holder, holder.cache_positions):
            return 0
        held = self.pipe.prompt_chunks(*holder.cached_prompt())
        # at least the last position is prefilled: its logits choose the first token
        n = chunks.media_start_before(min(shared_positions(held, chunks), chunks.n_positions - 1))
        if n > 0:
            self.kv.truncate(holder, n)
        return n if n > 0 and self.kv.holds(holder, n) else 0

    # ---- one turn --------------------------------------------------------------------------
    def ask(self, text: str, images: Sequence = (), video=None, *, stream: bool = False,
            params: SamplingParams | None = None, encoded: EncodedMessage | None = None,
            **sampling) -> GenerationResult | TextStream:
        params = params or SamplingParams(**sampling)
        s = TextStream(self.ask_events(text, images=images, video=video, params=params, encoded=encoded))
        if stream:
            return s
        for _ in s:
            pass
        return s.result

    def ask_events(self, text: str | None, *, images: Sequence = (), video=None,
                   params: SamplingParams | None = None,
                   encoded: EncodedMessage | None = None) -> Iterator[TokenEvent]:
        """Fit the turn, prefill it, stream the answer's tokens; the GenerationResult is the return value.
        `encoded` (from `Pipeline.encode_message`) replaces text/images/video: its vision timings are reported,
        and the time to first token counts from this call (the encoding happened before it)."""
        params = params or SamplingParams()
        start = time.perf_counter()
        if encoded is None:
            t = Timings()
            user, items = self.pipe.user_message(text, images, video, timings=t)
        else:
            if text or images or video is not None:
                raise PromptError("ask(encoded=...) carries its own text and media; pass no text, images or video")
            t = replace(encoded.timings)
            user, items = encoded.message, list(encoded.items)
        notices: list[str] = []
        ids, prefill_items, reuse = self._fit(user, items, params, notices)

        t0 = time.perf_counter()
        chunks = self._take_cache(self.pipe.prompt_chunks(ids, prefill_items), reuse)
        if not reuse:
            self.segments = []
        before = self.kv.length
        logits = prefill(self.kv.llm, chunks)
        t.prefill = time.perf_counter() - t0
        t.prefill_positions = chunks.n_positions
        t.prompt_positions = after = self.kv.length
        self.pipe.prefill_counts.add(t)
        self.segments.append((list(ids), list(prefill_items)))
        self.messages.append(user)
        self.turn_items.append(items)
        self.cache_positions = after
        self.pending = None

        limit = self.pipe.max_context
        answer = Answer(self.pipe.tokenizer, params.stop)
        drafts = DraftStats()
        history = [token for segment_ids, _ in self.segments for token in segment_ids]
        try:
            yield from answer.events(self.pipe.decode_tokens(logits, params, history=history, stats=drafts,
                                                             has_room=lambda: self.kv.length + 1 <= limit,
                                                             max_context=limit))
        finally:
            t.drafted_tokens, t.accepted_tokens = drafts.drafted, drafts.accepted
            if answer.finish == "context":
                self._notice(f"context full ({limit} positions): answer cut; /reset or ask again to drop "
                             f"old turns", notices)
            if answer.first_token_at is not None:
                t.ttft = answer.first_token_at - start
            t.decode = answer.decode_s
            t.generated_tokens = len(answer.token_ids)
            self._end_turn(answer, before, after)
            self.last = GenerationResult(answer.text, list(answer.token_ids), answer.finish, t, notices)
        return self.last


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _check_turns(prompt) -> list[Turn]:
    if prompt is None or isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise PromptError(f"prompt={prompt!r}: pass a string or a list of Turn objects")
    turns = list(prompt)
    if not all(isinstance(t, Turn) for t in turns):
        raise PromptError("prompt: a conversation is a list of vila_edge.Turn objects")
    if not turns or turns[-1].role != "user":
        raise PromptError("the conversation must end with a user turn")
    return turns


def load(engine_dir, *, device: str = "auto", threads: int | None = None, max_context: int | None = None,
         vision_backend: str = "auto", llm_backend: str = "auto", vision_cache_mb: float | None = None,
         prefix_reuse: bool = True, vision_threads: int | None = None,
         vision_precision: str | None = None) -> Pipeline:
    """Open an engine directory. Backends: "onnxruntime", "tensorrt" (vision), "tensorrt-llm" (LLM), or
    "auto" (the native NVIDIA engines when the directory has them and they import, else ONNX Runtime).
    `threads`: CPU threads of each engine (default: physical cores); `vision_threads` overrides it for the vision
    engine (the live captioner runs vision and LLM at once: their threads share the cores).
    `vision_cache_mb`: bound of the encoder-output cache in MiB (None: 256; 0: off). `prefix_reuse`: a new
    prompt (a `generate` call, a server request) keeps the KV of the start it shares with the previous one.
    `vision_precision` picks the ONNX Runtime tower graph (fp32 | fp16 | int8; default: int8 on CPUs when
    the build recorded its cosine vs fp32 >= 0.995, else fp32).

    Sets the process's glibc heap to serve blocks of 1 MiB and more from mmap (vila_edge.heap): without it a
    chat process held 170-420 MiB of freed repacking copies and tile activations (issue 19, P6)."""
    from vila_edge.backends import make_llm_engine, make_vision_engine

    large_blocks_from_mmap()
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    cfg = manifest.config
    tok_dir = engine_dir / TOKENIZER_DIR
    tokenizer = Tokenizer.from_dir(tok_dir)
    if cfg.splice == "head":
        # the media tokens must resolve to the ids the config recorded
        for name, idx in cfg.llm.media_token_ids.items():
            from vila_edge.tokenizer import MEDIA_TOKENS

            got = tokenizer.token_to_id(MEDIA_TOKENS[name])
            if got != idx:
                raise EngineError(f"{tok_dir}: {MEDIA_TOKENS[name]} has id {got}, the manifest says {idx}; rebuild")
    # the LLM first: while ONNX Runtime repacks its int4 weights, originals and packed copies coexist
    # (~1.4x the weights for a moment); the vision weights are not resident yet then (issue 19, P6)
    llm = make_llm_engine(llm_backend, engine_dir, manifest, device=device, threads=threads,
                          max_context=max_context or cfg.llm.max_length)
    vision = make_vision_engine(vision_backend, engine_dir, manifest, device=device, threads=vision_threads or threads,
                                precision=vision_precision)
    return Pipeline(cfg, tokenizer, vision, llm, engine_dir=engine_dir, manifest=manifest,
                    vision_cache=VisionCache.of_megabytes(vision_cache_mb), prefix_reuse=prefix_reuse)


__all__ = ["Conversation", "EncodedMessage", "GenerationResult", "Pipeline", "TextStream", "Timings", "TokenEvent", "Turn", "load",
           "VilaEdgeError"]
