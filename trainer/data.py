"""Captioned images: where they come from, how they are cropped, and in which order they train.

Three sources: a folder of images with same-name `.txt` captions (the kohya / ComfyUI
convention, subfolders included; `--caption-extension .caption` for kohya's other one); a
JSONL file of {"image", "caption"} lines (image paths relative to the file); COCO caption
JSON with its image folder, filtered as in the paper to captions with at least two noun
phrases (spaCy). Entries that cannot be used are skipped and counted, never a traceback.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and what to do."""


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than PIL decodes (a decompression bomb, or a huge scan)."""


@dataclass(frozen=True)
class MaskSource:
    """One object's mask for --mask-loss: the caption words it names ("red circle") and where its pixels are,
    a binary image file (`path`) or COCO segmentations (`coco`: JSON of {"height", "width", "segmentations"})."""
    words: str
    path: Path | None = None
    coco: str | None = None
    where: str = ""  # for messages

    def content(self) -> bytes:
        """What the mask's cache entry is keyed on: the file's bytes, or the segmentations' JSON."""
        return self.path.read_bytes() if self.path is not None else self.coco.encode("utf-8")


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    masks: tuple[MaskSource, ...] = ()


@dataclass
class Skipped:
    """What was left out, by reason, with a few file names to show the user; and what was kept
    but changed (`noted`, e.g. invalid UTF-8 replaced), the same way."""
    counts: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    noted: dict = field(default_factory=dict)
    noted_samples: dict = field(default_factory=dict)

    def add(self, reason: str, what) -> None:
        _count(self.counts, self.samples, reason, what)

    def note(self, reason: str, what) -> None:
        _count(self.noted, self.noted_samples, reason, what)

    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return "; ".join(f"{n} {reason} (e.g. {', '.join(self.samples[reason])})" for reason, n in self.counts.items())

    def describe_noted(self) -> str:
        return "; ".join(f"{n} {reason} (e.g. {', '.join(self.noted_samples[reason])})"
                         for reason, n in self.noted.items())


def _count(counts: dict, samples: dict, reason: str, what) -> None:
    counts[reason] = counts.get(reason, 0) + 1
    samples.setdefault(reason, [])
    if len(samples[reason]) < 3:
        samples[reason].append(str(what))


INVALID_UTF8 = "caption with invalid UTF-8 (kept, bad bytes replaced by U+FFFD)"


def decode_text(data: bytes, skipped: Skipped, where) -> str:
    """UTF-8 (a leading byte-order mark dropped); invalid bytes are replaced, and noted."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        skipped.note(INVALID_UTF8, where)
        return data.decode("utf-8-sig", errors="replace")


def _caption_problem(caption) -> str | None:
    if caption is None:
        return "missing caption"
    if not isinstance(caption, str):
        return "caption that is not text"
    if not caption.strip():
        return "empty caption"
    return None


def _keep(examples, skipped, image, caption, on_bad: str):
    problem = _caption_problem(caption)
    if problem is None:
        examples.append(Example(Path(image), caption.strip()))
        return
    what = f"{image} ({type(caption).__name__}: {str(caption)[:40]})" if problem == "caption that is not text" else image
    if on_bad == "fail":
        raise DataError(f"{problem} for image {what}: write a caption, or pass --bad-captions skip to leave it out")
    skipped.add(problem, what)


def _bad_reference(skipped, on_bad_image: str, reason: str, where) -> None:
    if on_bad_image == "fail":
        raise DataError(f"{reason}: {where}; fix the entry, or pass --bad-images skip to leave it out")
    skipped.add(reason, where)


def caption_suffix(extension: str) -> str:
    """".txt", ".caption": the caption file's suffix, a leading dot added when missing."""
    extension = extension.strip()
    return extension if extension.startswith(".") else "." + extension


MASKS_SUFFIX = ".masks"  # image.png's object masks: image.masks/<words>.png, "_" for a space ("red_circle.png")


def folder_masks(image: Path) -> tuple[MaskSource, ...]:
    """The masks in `image.masks/` beside an image, each named by the caption words it covers."""
    folder = image.with_suffix(MASKS_SUFFIX)
    if not folder.is_dir():
        return ()
    return tuple(MaskSource(p.stem.replace("_", " "), path=p, where=str(p)) for p in sorted(folder.iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_folder(root: Path, on_bad_caption: str, skipped: Skipped, caption_extension: str = ".txt") -> list[Example]:
    examples: list[Example] = []
    suffix = caption_suffix(caption_extension)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.endswith(MASKS_SUFFIX) for part in p.relative_to(root).parent.parts))
    for image in images:
        text = image.with_suffix(suffix)
        caption = None
        if text.is_file():
            try:
                caption = decode_text(text.read_bytes(), skipped, text)
            except OSError as error:
                skipped.add("unreadable caption file", f"{text} ({error.strerror or error})")
                continue
        _keep(examples, skipped, image, caption, on_bad_caption)
        masks = folder_masks(image)
        if masks and examples and examples[-1].image == Path(image):
            examples[-1] = Example(examples[-1].image, examples[-1].caption, masks)
    return examples


def read_jsonl(path: Path, on_bad_caption: str, skipped: Skipped, on_bad_image: str = "skip") -> list[Example]:
    examples: list[Example] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        line = decode_text(raw, skipped, f"{path}:{number}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DataError(f"{path}:{number} is not a JSON line ({error})") from error
        if not isinstance(record, dict) or "image" not in record:
            raise DataError(f"{path}:{number} is not a JSON object with an \"image\" key: {line[:80]}")
        image = record["image"]
        if not isinstance(image, str) or not image.strip():
            _bad_reference(skipped, on_bad_image, "entry whose image is not a file path",
                           f"{path}:{number} (image {image!r})")
            continue
        _keep(examples, skipped, path.parent / image, record.get("caption"), on_bad_caption)
    return examples


def noun_phrase_counter():
    """spaCy's noun chunks, as the paper filters COCO; a DataError that says how to get it otherwise."""
    try:
        import spacy
    except ImportError:
        raise DataError("the COCO caption filter (at least two noun phrases, as in the paper) needs spaCy: "
                        "pip install spacy && python -m spacy download en_core_web_sm, "
                        "or pass --coco-min-noun-phrases 0 to train on every caption") from None
    try:
        nlp = spacy.load("en_core_web_sm", disable=["ner", "lemmatizer"])
    except OSError:
        raise DataError("spaCy is installed but its English model is not: python -m spacy download en_core_web_sm "
                        "(or pass --coco-min-noun-phrases 0)") from None
    return lambda text: sum(1 for _ in nlp(text).noun_chunks)


def _order(value) -> tuple:
    """A sort key for ids of any JSON type: numbers in numeric order, then everything else as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, json.dumps(value, sort_keys=True))


UNNAMED_CATEGORY = "COCO object whose category the caption does not name (its pixels left unsupervised)"


def coco_masks(instances, image_id, caption: str, skipped: Skipped) -> tuple[MaskSource, ...]:
    """The masks of image `image_id`'s categories that `caption` names (name or plural), one per category (the
    union of its objects); a category the caption does not name is counted and left out."""
    from .coco_masks import named_as

    sizes, objects = instances
    found = []
    for name, segmentations in sorted(objects.get(image_id, {}).items()):
        words = named_as(name, caption)
        if words is None:
            skipped.note(UNNAMED_CATEGORY, f"{name!r} in image {image_id}")
            continue
        height, width = sizes[image_id]
        found.append(MaskSource(words, coco=json.dumps({"height": height, "width": width,
                                                        "segmentations": segmentations}, sort_keys=True),
                                where=f"{name!r} objects of image {image_id}"))
    return tuple(found)


def read_coco(path: Path, images: Path | None, min_noun_phrases: int, on_bad_caption: str,
              skipped: Skipped, instances: Path | None = None) -> list[Example]:
    try:
        coco = json.loads(decode_text(path.read_bytes(), skipped, path))
        files = {record["id"]: record["file_name"] for record in coco["images"]}
        annotations = coco["annotations"]
        if not isinstance(annotations, list):
            raise TypeError(f"\"annotations\" is a {type(annotations).__name__}, not a list")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path} is not COCO caption JSON (needs \"images\" with id/file_name and "
                        f"\"annotations\" with image_id/caption): {error}") from error
    folder = Path(images) if images else path.parent
    count = noun_phrase_counter() if min_noun_phrases > 0 else None
    if instances is not None:
        from .coco_masks import CocoMaskError, read_instances
        try:
            instances = read_instances(instances)
        except CocoMaskError as error:
            raise DataError(str(error)) from None
    examples: list[Example] = []
    usable = []
    for index, record in enumerate(annotations):
        if not isinstance(record, dict):
            skipped.add("annotation that is not a JSON object", f"annotations[{index}]")
        elif "image_id" not in record:
            skipped.add("annotation without image_id", f"annotations[{index}] (id {record.get('id')!r})")
        elif not isinstance(record["image_id"], (int, str)) or record["image_id"] not in files:
            skipped.add("caption of an unknown image", record["image_id"])
        else:
            usable.append(record)
    for record in sorted(usable, key=lambda r: (_order(r["image_id"]), _order(r.get("id", 0)))):
        if not isinstance(files[record["image_id"]], str):
            skipped.add("image entry whose file_name is not text", record["image_id"])
            continue
        caption = record.get("caption")
        if count is not None and _caption_problem(caption) is None and count(caption) < min_noun_phrases:
            skipped.add(f"caption with fewer than {min_noun_phrases} noun phrases", caption)
            continue
        before = len(examples)
        _keep(examples, skipped, folder / files[record["image_id"]], caption, on_bad_caption)
        if instances is not None and len(examples) > before:
            kept = examples[-1]
            examples[-1] = Example(kept.image, kept.caption, coco_masks(instances, record["image_id"], kept.caption,
                                                                        skipped))
    return examples


def read_examples(data: str, data_format: str, coco_images: str | None, coco_min_noun_phrases: int,
                  on_bad_caption: str, caption_extension: str = ".txt", on_bad_image: str = "skip",
                  coco_instances: str | None = None) -> tuple[list[Example], Skipped]:
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data!r} does not exist")
    if data_format == "auto":
        data_format = "folder" if path.is_dir() else "jsonl" if path.suffix.lower() == ".jsonl" else "coco"
    skipped = Skipped()
    if coco_instances and data_format != "coco":
        raise DataError(f"--coco-instances goes with COCO caption JSON as --data, but --data {data!r} is read as "
                        f"{data_format}; a folder's masks go in <image>.masks/ (trainer/README.md)")
    if data_format == "folder":
        if not path.is_dir():
            raise DataError(f"--data {data!r} is not a folder (data_format folder)")
        examples = read_folder(path, on_bad_caption, skipped, caption_extension)
    elif data_format == "jsonl":
        examples = read_jsonl(path, on_bad_caption, skipped, on_bad_image)
    else:
        examples = read_coco(path, Path(coco_images) if coco_images else None, coco_min_noun_phrases,
                             on_bad_caption, skipped, Path(coco_instances) if coco_instances else None)
    return examples, skipped


# -- images -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning: original size, crop's top-left corner, target size (pixels)."""
    original: tuple[int, int]  # (width, height)
    crop: tuple[int, int]      # (left, top) in the resized image
    target: tuple[int, int]    # (width, height)

    def as_list(self) -> list[int]:
        return [*self.original, *self.crop, *self.target]

    @classmethod
    def from_list(cls, values) -> "SizeConditioning":
        values = [int(v) for v in values]
        return cls(tuple(values[0:2]), tuple(values[2:4]), tuple(values[4:6]))


def buckets_for(resolution: int) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution² pixels, sides multiples of resolution/8, aspect up to 4:1."""
    step = max(8, resolution // 8)
    out = []
    for width in range(step, 2 * resolution + 1, step):
        height = (resolution * resolution // width) // step * step
        if height >= step and 0.25 <= width / height <= 4.0:
            out.append((width, height))
    return out


def target_size(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    if not buckets:
        return resolution, resolution
    aspect = math.log(width / height)
    return min(buckets_for(resolution), key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def load_image(path: Path, resolution: int, buckets: bool):
    """(pixels [H,W,3] float in [0,1], SizeConditioning): resized to cover the target, then centre-cropped.

    Raises OSError / ValueError for an unreadable or corrupt file, ImageTooLarge for one that
    claims more pixels than PIL will decode.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(str(error)) from None
    original = image.size
    target = target_size(*original, resolution, buckets)
    scale = max(target[0] / original[0], target[1] / original[1])
    resized = (max(target[0], round(original[0] * scale)), max(target[1], round(original[1] * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2
    image = image.crop((left, top, left + target[0], top + target[1]))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(target[1], target[0], 3)
    return pixels.float() / 255.0, SizeConditioning(original, (left, top), target)


# -- the order of training ----------------------------------------------------------------

def epoch_batches(groups: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global micro-batches of example indices; `groups[i]` is example i's bucket.

    Deterministic in (seed, epoch), so a resumed run and a run on more ranks see the same
    batches. Examples of one batch share a bucket; the remainder of each bucket is dropped.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(groups)))
    rng.shuffle(order)
    by_group: dict[int, list[int]] = {}
    for index in order:
        by_group.setdefault(groups[index], []).append(index)
    batches = [members[i:i + global_batch] for _, members in sorted(by_group.items())
               for i in range(0, len(members) - global_batch + 1, global_batch)]
    rng.shuffle(batches)
    return batches


def sample_generator(seed: int, micro_step: int, slot: int) -> torch.Generator:
    """The noise and timestep of one sample depend only on (seed, micro step, slot in the global batch):
    resuming, or splitting the batch across ranks, draws the same numbers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 4096 + slot)
