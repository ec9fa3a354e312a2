"""Content-keyed on-disk caches of VAE latents and text-encoder outputs.

A latent's key hashes the image's bytes, the crop settings (resolution, buckets) and the
VAE's identity; a text entry's key hashes the caption and the text encoders' identity. So a
second run encodes nothing, and an edited image or caption re-encodes only itself; identical
images or captions within a dataset are encoded once. Entries are small safetensors files,
written to a temporary name and renamed, with the permissions the umask gives any new file.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .data import DataError, Example, ImageTooLarge, Skipped, SizeConditioning, load_image
from .region_masks import PROBLEMS, region_targets

CROP_VERSION = "centre-cover-lanczos-1"  # change when load_image's crop changes: old latents no longer apply


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def latent_key(image_bytes: bytes, resolution: int, buckets: bool, vae_identity: str) -> str:
    return _digest("latent", hashlib.sha256(image_bytes).hexdigest(), resolution, buckets, CROP_VERSION, vae_identity)


def text_key(caption: str, text_identity: str) -> str:
    return _digest("text", caption, text_identity)


def regions_key(latent: str, text: str, masks) -> str:
    """A --mask-loss entry: the image's crop (its latent key), the caption and tokenizer (its text key), and every
    mask's words and bytes, so an edited, added or removed mask file makes a new entry."""
    from .region_masks import REGIONS_VERSION

    parts = sorted((m.words, hashlib.sha256(m.content()).hexdigest()) for m in masks)
    return _digest("regions", REGIONS_VERSION, latent, text, *(f"{w}:{h}" for w, h in parts))


class FeatureCache:
    """`root/latents/ab/<key>.safetensors` and `root/text/ab/<key>.safetensors`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        try:
            tmp.write_bytes(data)  # open() applies the umask; safetensors' save_file would make it 0600
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(kind, key)))

    def shape(self, kind: str, key: str, name: str) -> list[int] | None:
        """A tensor's shape, read from the file's header without loading it; None when the entry is
        missing or unreadable (a truncated file is then encoded again)."""
        from safetensors import safe_open

        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                return list(handle.get_slice(name).get_shape())
        except Exception:  # SafetensorError, OSError, a missing name: whatever it is, it is not a usable entry
            return None


@dataclass(frozen=True)
class Item:
    """One training example, as cache keys."""
    latent: str
    text: str
    bucket: tuple[int, int]  # latent (height, width): examples of one batch share it
    image: str = field(default="", compare=False)  # where it came from, for messages
    regions: str = ""  # the --mask-loss entry's key ("" without masks)


@dataclass
class EncodeCounts:
    latents_encoded: int = 0
    latents_cached: int = 0
    latents_repeated: int = 0  # the same image bytes as an earlier example: its latent is shared
    texts_encoded: int = 0
    texts_cached: int = 0
    texts_repeated: int = 0    # the same caption as an earlier example: its encoding is shared

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Prepared:
    items: list[Item]
    skipped: Skipped
    counts: EncodeCounts = field(default_factory=EncodeCounts)

    def dataset_hash(self) -> str:
        return _digest(*(f"{item.latent}:{item.text}" + (f":{item.regions}" if item.regions else "")
                         for item in self.items))


def prepare(examples: list[Example], cache: FeatureCache, open_encoders, resolution: int, buckets: bool,
            on_bad_image: str, skipped: Skipped, identities: tuple[str, str], shard: tuple[int, int] = (0, 1),
            ) -> Prepared:
    """Cache keys for every usable example; encodes only what the cache lacks.

    `open_encoders()` is called at most once, on the first miss, so a fully cached dataset
    never loads the VAE or the text encoders. `shard` = (rank, world): each rank encodes
    its share; every rank returns the keys of all examples (the caller waits for the others).
    """
    vae_identity, text_identity = identities
    encoders = None
    prepared = Prepared([], skipped)
    counts = prepared.counts
    rank, world = shard
    buckets_of: dict[str, tuple[int, int]] = {}  # latents met so far in this run (any rank's)
    texts_seen: set[str] = set()
    for index, example in enumerate(examples):
        mine = index % world == rank
        try:
            image_bytes = example.image.read_bytes()
        except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte
            _bad_image(example, f"unreadable image ({getattr(error, 'strerror', None) or error})", on_bad_image, skipped)
            continue
        lkey = latent_key(image_bytes, resolution, buckets, vae_identity)
        tkey = text_key(example.caption, text_identity)
        if lkey in buckets_of:
            counts.latents_repeated += mine
            bucket = buckets_of[lkey]
        elif (shape := cache.shape("latents", lkey, "latent")) is not None:
            counts.latents_cached += mine
            bucket = tuple(shape[-2:])
        else:
            try:
                pixels, size = load_image(example.image, resolution, buckets)
            except ImageTooLarge as error:
                _bad_image(example, f"image too large to decode ({error})", on_bad_image, skipped)
                continue
            except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for broken files
                _bad_image(example, f"corrupt image ({type(error).__name__}: {error})", on_bad_image, skipped)
                continue
            bucket = (size.target[1] // 8, size.target[0] // 8)
            if mine:
                encoders = encoders or open_encoders()
                latent = encoders.encode_image(pixels.unsqueeze(0))[0]
                cache.put("latents", lkey, {"latent": latent, "size": torch.tensor(size.as_list())})
                counts.latents_encoded += 1
        buckets_of[lkey] = bucket
        if tkey in texts_seen:
            counts.texts_repeated += mine
        elif cache.shape("text", tkey, "context") is not None:
            counts.texts_cached += mine
        elif mine:
            encoders = encoders or open_encoders()
            context, pooled = encoders.encode_text(example.caption)
            cache.put("text", tkey, {"context": context[0], "pooled": pooled[0]})
            counts.texts_encoded += 1
        texts_seen.add(tkey)
        rkey = ""
        if example.masks:
            try:
                rkey = regions_key(lkey, tkey, example.masks)
            except OSError as error:  # a mask file that vanished or cannot be read
                skipped.add("mask left out: unreadable", f"{example.image} ({error.strerror or error})")
        if rkey:
            cached = cache.shape("regions", rkey, "problems") is not None
            if not cached and mine:
                encoders = encoders or open_encoders()
                size = (SizeConditioning.from_list(cache.get("latents", lkey)["size"].tolist())
                        if cache.has("latents", lkey) else load_image(example.image, resolution, buckets)[1])
                positions, masks, problems = region_targets(example.masks, size, encoders.word_positions(example.caption))
                cache.put("regions", rkey, {"positions": positions, "masks": masks, "problems": problems})
            if cached or mine:
                problems = cache.get("regions", rkey)["problems"].tolist()
                for source, code in zip(example.masks, problems):
                    if code:
                        skipped.add(PROBLEMS[code], source.where or source.words)
        prepared.items.append(Item(lkey, tkey, bucket, str(example.image), rkey))
    if encoders is not None:
        encoders.close()  # the encoders leave memory before training starts
    return prepared


def _bad_image(example: Example, why: str, on_bad_image: str, skipped: Skipped) -> None:
    if on_bad_image == "fail":
        raise DataError(f"{why}: {example.image}; fix or remove it, or pass --bad-images skip to leave it out")
    skipped.add(why.split(" (")[0], example.image)


def load_batch(cache: FeatureCache, items: list[Item], cut: list | None = None):
    """Stacked raw latents [B,4,h,w], contexts [B,T,2048], pooled [B,1280] and size conditionings.

    Captions whose lengths would pad the batch beyond ComfyUI's limit are cut (`batch_lengths`);
    each cut is appended to `cut`, when given, as (item, tokens before, tokens after).
    """
    latents, contexts, pooled, sizes = [], [], [], []
    for item in items:
        entry = cache.get("latents", item.latent)
        text = cache.get("text", item.text)
        latents.append(entry["latent"].float())
        sizes.append(SizeConditioning.from_list(entry["size"].tolist()))
        contexts.append(text["context"].float())
        pooled.append(text["pooled"].float())
    lengths = batch_lengths([c.shape[0] for c in contexts])
    for i, (item, context, length) in enumerate(zip(items, contexts, lengths)):
        if length < context.shape[0]:
            contexts[i] = context[:length]
            if cut is not None:
                cut.append((item, context.shape[0], length))
    return torch.stack(latents), stack_contexts(contexts), torch.stack(pooled), sizes


CHUNK = 77          # tokens per CLIP chunk: a long prompt is 77, 154, 231, ... tokens
MAX_PADDING = 4     # ComfyUI's limit (comfy/conds.py, CONDCrossAttn.can_concat): repeat at most 4x the shortest


def batch_lengths(lengths: list[int], chunk: int = CHUNK) -> list[int]:
    """Token counts for the captions of one batch such that repeating each to their least common
    multiple costs at most MAX_PADDING times the shortest, as ComfyUI allows when it batches conds.

    Unchanged when they already fit. Otherwise longer captions are cut to whole chunks: among
    common lengths L = k x the shortest (k = 1..MAX_PADDING), each caption keeps the longest
    whole-chunk divisor of L it has, and the L that cuts the fewest chunks wins (ties: the smaller).
    ComfyUI itself would run such conds as separate batches; a training batch is one UNet call.
    """
    if not lengths or any(n % chunk for n in lengths) or math.lcm(*lengths) <= MAX_PADDING * min(lengths):
        return list(lengths)
    chunks = [n // chunk for n in lengths]
    shortest = min(chunks)
    best = None
    for k in range(1, MAX_PADDING + 1):
        common = k * shortest
        kept = [max(d for d in range(1, min(c, common) + 1) if common % d == 0) for c in chunks]
        cost = sum(c - d for c, d in zip(chunks, kept))
        if best is None or cost < best[0]:
            best = (cost, kept)
    return [d * chunk for d in best[1]]


def stack_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Prompts of 77, 154, ... tokens in one batch: repeat each to the least common multiple, as ComfyUI's conds do
    (attention over a context repeated whole gives the same output; `batch_lengths` bounds the cost)."""
    lengths = [c.shape[0] for c in contexts]
    common = math.lcm(*lengths)
    return torch.stack([c.repeat(common // c.shape[0], 1) for c in contexts])
