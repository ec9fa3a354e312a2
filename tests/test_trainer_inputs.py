"""The trainer's inputs: bad entries are skipped and counted (or a clear error), never a traceback;
kohya's caption files; long captions in one batch; what the caches report; --help."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from trainer.cache import FeatureCache, Item, load_batch, prepare, stack_contexts
from trainer.data import DataError, read_examples
from trainer.demo import DemoEncoders, write_demo_dataset
from trainer.train import main

TINY = ["--demo", "--resolution", "32", "--gate-hidden-dim", "16", "--batch-size", "1", "--grad-accum", "1",
        "--warmup-steps", "2", "--no-progress", "--no-tensorboard", "--steps", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def png_claiming(width: int, height: int) -> bytes:
    """A ~65-byte PNG whose header claims width x height pixels (no pixel data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def prepare_folder(folder, cache, on_bad_image="skip", resolution=32, **read):
    examples, skipped = read_examples(str(folder), "auto", None, 0, "skip", on_bad_image=on_bad_image, **read)
    return prepare(examples, FeatureCache(cache), DemoEncoders, resolution, False, on_bad_image, skipped,
                   DemoEncoders.identities), skipped


# -- bad data --------------------------------------------------------------------------------------

def test_a_decompression_bomb_is_skipped_and_counted_or_a_clear_error(tmp_path, capsys):
    data = write_demo_dataset(tmp_path / "data", 2, seed=1)
    bomb = png_claiming(40000, 40000)
    assert len(bomb) < 100
    (data / "bomb.png").write_bytes(bomb)
    (data / "bomb.txt").write_text("a picture of everything")
    code = main(TINY + ["--output", str(tmp_path / "run"), "--data", str(data)])  # --bad-images skip: the default
    assert code == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["skipped"] == {"image too large to decode": 1}
    assert "1 image too large to decode" in capsys.readouterr().err

    prepared, skipped = prepare_folder(data, tmp_path / "cache")
    assert len(prepared.items) == 2 and skipped.counts == {"image too large to decode": 1}
    assert "bomb.png" in skipped.describe()
    with pytest.raises(DataError, match="image too large to decode.*bomb.png.*--bad-images skip"):
        prepare_folder(data, tmp_path / "cache", on_bad_image="fail")


def test_jsonl_entries_with_no_image_path_a_non_text_caption_or_invalid_utf8_are_counted(tmp_path):
    from trainer.data import INVALID_UTF8

    data = write_demo_dataset(tmp_path / "data", 3, seed=0)
    images = [str(p.relative_to(tmp_path)) for p in sorted(data.rglob("*.png"))]
    lines = [json.dumps({"image": 5, "caption": "a number"}).encode(),
             json.dumps({"image": None, "caption": "nothing"}).encode(),
             json.dumps({"image": images[0], "caption": ["a", "list"]}).encode(),
             b'{"image": "' + images[1].encode() + b'", "caption": "a caf\xe9 on a square"}',  # latin-1, not UTF-8
             json.dumps({"image": images[2], "caption": "a red circle"}).encode()]
    (tmp_path / "data.jsonl").write_bytes(b"\n".join(lines))
    examples, skipped = read_examples(str(tmp_path / "data.jsonl"), "auto", None, 0, "skip")
    assert [e.caption for e in examples] == ["a caf\ufffd on a square", "a red circle"]
    assert skipped.counts == {"entry whose image is not a file path": 2, "caption that is not text": 1}
    assert skipped.noted == {INVALID_UTF8: 1} and "data.jsonl:4" in skipped.describe_noted()
    assert "data.jsonl:1 (image 5)" in skipped.describe() and "(list: ['a', 'list'])" in skipped.describe()

    with pytest.raises(DataError, match=r"data.jsonl:1 \(image 5\).*--bad-images skip"):
        read_examples(str(tmp_path / "data.jsonl"), "auto", None, 0, "skip", on_bad_image="fail")
    with pytest.raises(DataError, match="caption that is not text for image .*list"):
        read_examples(str(tmp_path / "data.jsonl"), "auto", None, 0, "fail")
    (tmp_path / "broken.jsonl").write_bytes(b'{"image": "a.png", "capt')
    with pytest.raises(DataError, match="broken.jsonl:1 is not a JSON line"):
        read_examples(str(tmp_path / "broken.jsonl"), "auto", None, 0, "skip")


def test_coco_annotations_without_image_id_or_with_odd_ids_are_counted(tmp_path):
    data = write_demo_dataset(tmp_path / "data", 2, seed=0)
    images = sorted(data.rglob("*.png"))
    coco = {"images": [{"id": 1, "file_name": images[0].name}, {"id": "b", "file_name": images[1].name}],
            "annotations": [{"id": 9, "caption": "a caption that lost its image"},
                            {"image_id": "b", "id": 4, "caption": "a green square"},
                            {"image_id": 1, "id": 7, "caption": "a red ball on a table"},
                            {"image_id": 2, "id": 8, "caption": "an image that is not listed"},
                            {"image_id": [1], "id": 10, "caption": "an id that is a list"},
                            {"image_id": 1, "id": 11, "caption": ["not", "text"]},
                            "not an object"]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    examples, skipped = read_examples(str(tmp_path / "captions.json"), "coco", str(data / "set0"), 0, "skip")
    assert [(e.image.name, e.caption) for e in examples] == [(images[0].name, "a red ball on a table"),
                                                             (images[1].name, "a green square")]
    assert skipped.counts == {"annotation without image_id": 1, "caption of an unknown image": 2,
                              "annotation that is not a JSON object": 1, "caption that is not text": 1}


def test_invalid_utf8_in_a_caption_file_is_kept_replaced_and_said(tmp_path, capsys):
    from trainer.data import INVALID_UTF8

    data = write_demo_dataset(tmp_path / "data", 2, seed=2)
    caption = sorted(data.rglob("*.txt"))[0]
    caption.write_bytes(b"\xef\xbb\xbfa stra\xdfe sign")  # a BOM, then latin-1 for "straße"
    examples, skipped = read_examples(str(data), "folder", None, 0, "skip")
    assert "a stra\ufffde sign" in [e.caption for e in examples]  # BOM dropped, bad byte replaced
    assert skipped.noted == {INVALID_UTF8: 1} and skipped.counts == {}
    code = main(TINY + ["--output", str(tmp_path / "run"), "--data", str(data)])
    assert code == 0
    assert f"kept with a change: 1 {INVALID_UTF8} (e.g. {caption})" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["kept_with_a_change"] == {INVALID_UTF8: 1}


# -- kohya's .caption files --------------------------------------------------------------------------

def test_caption_extension_reads_kohya_caption_files(tmp_path):
    data = write_demo_dataset(tmp_path / "data", 2, seed=4)
    for text in data.rglob("*.txt"):
        text.with_suffix(".caption").write_text("kohya: " + text.read_text())
    default, _ = read_examples(str(data), "folder", None, 0, "skip")
    kohya, _ = read_examples(str(data), "folder", None, 0, "skip", caption_extension=".caption")
    bare, _ = read_examples(str(data), "folder", None, 0, "skip", caption_extension="caption")
    assert len(default) == 2 and not any(e.caption.startswith("kohya") for e in default)
    assert [e.caption for e in kohya] == ["kohya: " + e.caption for e in default] == [e.caption for e in bare]

    from trainer.config import ConfigError, parse_config
    assert parse_config(["--demo", "--caption-extension", ".caption"]).caption_extension == ".caption"
    assert parse_config(["--demo"]).caption_extension == ".txt"
    with pytest.raises(ConfigError, match="caption_extension"):
        parse_config(["--demo", "--caption-extension", "."])


@pytest.mark.parametrize("extension", [".png", "png", ".JPG", ".jpeg", ".webp", ".bmp", ".gif", ".tiff"])
def test_a_picture_extension_is_refused_as_caption_extension(extension):
    from trainer.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=rf"caption_extension '{re.escape(extension)}' is a picture format: each image "
                                          r"would be read as its own caption"):
        parse_config(["--demo", "--caption-extension", extension])


# -- numbers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--gate-init-bias", "nan"], "argument --gate-init-bias: 'nan' is not a finite number"),
    (["--gate-init-bias", "inf"], "argument --gate-init-bias: 'inf' is not a finite number"),
    (["--gate-init-bias=-inf"], "argument --gate-init-bias: '-inf' is not a finite number"),
    (["--gate-init-bias", "1e40"], "argument --gate-init-bias: 1e40 is beyond float32's range"),
    (["--gate-init-bias=-3.5e38"], "argument --gate-init-bias: -3.5e38 is beyond float32's range"),
    (["--gate-init-bias", "three"], "argument --gate-init-bias: 'three' is not a number"),
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["--grad-clip", "inf"], "argument --grad-clip: 'inf' is not a finite number"),
    (["--weight-decay", "nan"], "argument --weight-decay: 'nan' is not a finite number"),
    (["--threshold", "2"], "threshold must be a number in [0, 1], got 2.0"),
    (["--negative-value=-1e39"], "negative_value must be a finite negative number no lower than float32's"),
])
def test_numbers_a_run_cannot_train_with_are_refused_while_parsing(argv, message, capsys, monkeypatch):
    import trainer.train

    def no_work(*args):
        raise AssertionError("the run started")

    monkeypatch.setattr(trainer.train, "train", no_work)
    assert main(["--demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("key, value, message", [
    ("gate_init_bias", float("nan"), "gate_init_bias must be a finite number"),
    ("gate_init_bias", 1e39, "gate_init_bias must lie within float32's range"),
    ("lr", float("inf"), "lr must be a finite number"),
])
def test_numbers_from_a_config_file_are_checked_as_flags_are(tmp_path, key, value, message):
    from trainer.config import ConfigError, parse_config

    (tmp_path / "run.yaml").write_text(f"demo: true\n{key}: {value}\n".replace("nan", ".nan").replace("inf", ".inf"))
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(tmp_path / "run.yaml")])


def test_the_largest_float32_gate_init_bias_is_accepted():
    from trainer.config import parse_config

    assert parse_config(["--demo", "--gate-init-bias", "3.4028234e38"]).gate_init_bias == 3.4028234e38
    assert parse_config(["--demo", "--gate-init-bias=-3"]).gate_init_bias == -3.0


# -- --install and --resume, checked before the first step ----------------------------------------

@pytest.mark.parametrize("blocked", ["a file", "read-only"])
def test_install_into_an_unwritable_models_maskattn_fails_before_the_first_step(tmp_path, gate_folder, capsys, blocked):
    import os

    data = write_demo_dataset(tmp_path / "data", 2, seed=0)
    if blocked == "a file":
        gate_folder.rmdir()
        gate_folder.write_text("a file where the folder should be")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        gate_folder.chmod(0o555)
    code = main(TINY + ["--steps", "3", "--install", "--output", str(tmp_path / "run"), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 1
    reason = "is a file, not a folder" if blocked == "a file" else "is not writable (Permission denied)"
    assert f"error: --install: MaskAttn Loader's folder {gate_folder} {reason}; fix its permissions, or leave out " \
           "--install and copy the gates there yourself" in err
    assert "training" not in err and not (tmp_path / "run" / "checkpoints").exists()  # no step was taken
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


RESUME = TINY[:-2] + ["--steps", "4", "--save-every", "100", "--lr", "1e-2", "--base-loss-every", "0"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """(a dataset, a run stopped with a checkpoint at step 2 of 4, the same 4 steps run in one go)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_demo_dataset(root / "data", 3, seed=5)
    assert main(RESUME + ["--output", str(root / "whole"), "--data", str(data)]) == 0
    assert main(RESUME + ["--stop-at", "2", "--output", str(root / "stopped"), "--data", str(data)]) == 0
    return data, root / "stopped", root / "whole" / "maskattn_demo.safetensors"


def resume(stopped_run, tmp_path, *flags, data=None):
    import shutil

    original_data, stopped, _ = stopped_run
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    return main(RESUME + ["--resume", "--output", str(run), "--data", str(data or original_data), *flags]), run


def same_file_tensors(a, b) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_another_unet_precision_is_refused_and_the_same_dtype_by_another_name_is_said(
        stopped_run, tmp_path, capsys):
    code, run = resume(stopped_run, tmp_path, "--precision", "fp64")
    err = capsys.readouterr().err
    assert code == 1 and "training" not in err
    assert f"error: cannot resume from {run / 'checkpoints' / 'step-00000002'} exactly: the frozen UNet's precision " \
           "(torch.float32 -> torch.float64, --precision 'auto' -> 'fp64') changed since it was written; restore " \
           "them, or train into a new --output" in err

    code, run = resume(stopped_run, tmp_path / "fp32", "--precision", "fp32")  # auto is float32 on the CPU
    assert code == 0
    assert "--resume: --precision 'auto' -> 'fp32' gives the same torch.float32 UNet" in capsys.readouterr().err
    assert same_file_tensors(run / "maskattn_demo.safetensors", stopped_run[2])


def test_resuming_a_checkpoint_without_its_unet_dtype_needs_the_same_precision_flag(stopped_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(stopped_run[1], copy)
    state_path = copy / "checkpoints" / "step-00000002" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["unet_dtype"]  # as written before it was recorded
    torch.save(state, state_path)
    code, _ = resume((stopped_run[0], copy, stopped_run[2]), tmp_path, "--precision", "fp32")
    assert code == 1 and "the frozen UNet's precision (auto -> fp32" in capsys.readouterr().err


def test_resuming_on_a_changed_dataset_is_refused_naming_the_change(stopped_run, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(stopped_run[0], data)
    caption = sorted(data.rglob("*.txt"))[0]
    caption.write_text(caption.read_text() + " and a blue square")
    code, _ = resume(stopped_run, tmp_path, data=data)
    err = capsys.readouterr().err
    assert code == 1 and "training" not in err
    assert re.search(r"exactly: the dataset \(3 examples, sha256 [0-9a-f]{12} -> 3 examples, [0-9a-f]{12}\) changed "
                     r"since it was written; restore them, or train into a new --output", err), err
    shutil.copytree(stopped_run[0], tmp_path / "same_data")  # another path to the same examples: resumes
    code, _ = resume(stopped_run, tmp_path / "again", data=tmp_path / "same_data")
    assert code == 0


def test_resuming_with_gradient_checkpointing_changed_says_so_and_continues_exactly(stopped_run, tmp_path, capsys):
    from trainer.demo import tiny_unet

    try:
        code, run = resume(stopped_run, tmp_path, "--gradient-checkpointing")
    finally:
        tiny_unet.cache_clear()  # checkpointing patched the cached demo UNet's blocks: later tests build a fresh one
    assert code == 0
    assert "--resume: gradient_checkpointing False -> True: it recomputes the same activations, so the run " \
           "continues exactly" in capsys.readouterr().err
    assert same_file_tensors(run / "maskattn_demo.safetensors", stopped_run[2])  # bit for bit


# -- long captions in one batch ----------------------------------------------------------------------

def test_captions_of_7_and_11_chunks_are_cut_to_what_comfyui_would_batch_not_padded_to_5929_tokens():
    from comfy.conds import CONDCrossAttn
    from trainer.cache import batch_lengths

    assert batch_lengths([7 * 77, 11 * 77]) == [7 * 77, 7 * 77]
    assert batch_lengths([77, 5 * 77]) == [77, 4 * 77]
    assert batch_lengths([2 * 77, 3 * 77, 3 * 77]) == [2 * 77, 3 * 77, 3 * 77]  # lcm 6 chunks = 3x: fits
    assert batch_lengths([77, 2 * 77, 3 * 77]) == [77, 2 * 77, 2 * 77]  # lcm 6 > 4x: one chunk cut
    for lengths in ([77, 154], [77, 231], [154, 231], [77, 308], [7 * 77, 11 * 77], [77, 5 * 77]):
        kept = batch_lengths(lengths)
        contexts = [torch.randn(n, 8) for n in kept]
        conds = [CONDCrossAttn(c.unsqueeze(0)) for c in contexts]
        assert all(conds[0].can_concat(other) for other in conds[1:]), (lengths, kept)  # ComfyUI would batch them
        assert torch.equal(stack_contexts(contexts), conds[0].concat(conds[1:]))  # and stack them the same way
    assert not CONDCrossAttn(torch.zeros(1, 7 * 77, 1)).can_concat(CONDCrossAttn(torch.zeros(1, 11 * 77, 1)))


def test_a_cut_caption_keeps_its_first_chunks_and_is_said_once(tmp_path):
    from trainer.config import build_config
    from trainer.distributed import World
    from trainer.loop import GateTrainer
    from maskattn_comfy.model_check import require_sdxl
    from maskattn_comfy.patch import apply_maskattn
    from maskattn_core import GateSet
    from trainer.demo import tiny_unet

    cache = FeatureCache(tmp_path)
    g = torch.Generator().manual_seed(0)
    contexts = {"t7": torch.randn(7 * 77, 2048, generator=g), "t11": torch.randn(11 * 77, 2048, generator=g)}
    items = []
    for i, (key, context) in enumerate(contexts.items()):
        cache.put("latents", f"l{i}", {"latent": torch.randn(4, 4, 4, generator=g),
                                       "size": torch.tensor([32, 32, 0, 0, 32, 32])})
        cache.put("text", key, {"context": context, "pooled": torch.randn(1280, generator=g)})
        items.append(Item(f"l{i}", key, (4, 4), f"images/{key}.png"))
    cut = []
    _, stacked, _, _ = load_batch(cache, items, cut)
    assert stacked.shape == (2, 7 * 77, 2048)
    assert torch.equal(stacked[0], contexts["t7"]) and torch.equal(stacked[1], contexts["t11"][:7 * 77])
    assert [(item.image, before, after) for item, before, after in cut] == [("images/t11.png", 847, 539)]

    config = build_config(dict(demo=True, gate_hidden_dim=8, batch_size=2, grad_accum=1, steps=4, warmup_steps=0))
    model = tiny_unet(0).clone()
    for p in model.model.parameters():
        p.requires_grad_(False)
    gate_set = GateSet.create(config.maskattn(), require_sdxl(model), seed=1)
    trainer = GateTrainer(apply_maskattn(model, gate_set), gate_set, "eps", cache, items, config, World())
    first, second = trainer.train_step(), trainer.train_step()
    assert len(first.notes) == 1 and "images/t11.png (847 tokens) was cut to 539 tokens" in first.notes[0]
    assert second.notes == []


# -- what the caches report --------------------------------------------------------------------------

def test_identical_captions_are_encoded_once_and_the_message_says_so(tmp_path, capsys):
    data = write_demo_dataset(tmp_path / "data", 6, seed=0)
    captions = sorted(data.rglob("*.txt"))
    for text in captions[3:]:
        text.write_text(captions[0].read_text())  # four examples share one caption
    distinct = len({p.read_text() for p in captions})
    for run in range(2):
        code = main(TINY + ["--output", str(tmp_path / f"run{run}"), "--data", str(data),
                            "--cache-dir", str(tmp_path / "cache")])
        assert code == 0
        encode = json.loads((tmp_path / f"run{run}" / "run.json").read_text())["encode"]
        err = capsys.readouterr().err
        assert encode["texts_repeated"] == 6 - distinct == 3
        if run == 0:
            assert (encode["texts_encoded"], encode["texts_cached"]) == (distinct, 0)
            assert f"encoded 6 images and {distinct} captions, 0 and 0 from the cache; 3 captions repeat an " \
                   "earlier one exactly and share its encoding (each encoded once)" in err
        else:
            assert (encode["texts_encoded"], encode["texts_cached"], encode["latents_cached"]) == (0, distinct, 6)


def test_the_latent_cache_key_holds_the_resolution(tmp_path):
    data = write_demo_dataset(tmp_path / "data", 3, seed=6)
    small, _ = prepare_folder(data, tmp_path / "cache", resolution=32)
    large, _ = prepare_folder(data, tmp_path / "cache", resolution=64)
    again, _ = prepare_folder(data, tmp_path / "cache", resolution=32)
    assert small.counts.latents_encoded == 3 and large.counts.latents_encoded == 3  # 64 px is not 32 px re-read
    assert {item.bucket for item in small.items} == {(4, 4)} and {item.bucket for item in large.items} == {(8, 8)}
    assert again.counts.latents_encoded == 0 and again.counts.latents_cached == 3
    cache = FeatureCache(tmp_path / "cache")
    assert [tuple(cache.get("latents", i.latent)["latent"].shape) for i in large.items] == [(4, 8, 8)] * 3


# -- --help ------------------------------------------------------------------------------------------

def test_help_shows_every_choice_and_each_default_once(capsys):
    from trainer.config import CHOICES, parse_config

    with pytest.raises(SystemExit) as exit_code:
        parse_config(["--help"])
    assert exit_code.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, allowed in CHOICES.items():
        assert f"--{name.replace('_', '-')} {{{','.join(allowed)}}}" in text, name
    assert "--stage {high,mid,low,all}" in text
    options = text.split(" --")
    assert all(option.count("(default") <= 1 for option in options), [o for o in options if o.count("(default") > 1]
    assert "(default None)" not in text and "(default: <output>/cache)" in text and "(default .txt)" in text
