"""The headless trainer on a real ComfyUI host: tiny SDXL-topology model, 32x32 images, a few steps."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy.sample
from maskattn_comfy.model_check import require_sdxl
from maskattn_comfy.patch import apply_maskattn
from maskattn_comfy.tiny_model import build_sdxl_model, tiny_conditioning
from maskattn_core import GateSet, MaskAttnConfig, load_gate_file
from trainer import checkpoints
from trainer.base_model import BaseModelError, check_sdxl
from trainer.cache import stack_contexts
from trainer.config import ConfigError, parse_config
from trainer.data import DataError, epoch_batches, read_examples
from trainer.demo import tiny_unet, write_demo_dataset
from trainer.loop import enable_gradient_checkpointing, noise_prediction_loss, sdxl_adm
from trainer.train import main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--demo", "--resolution", "32", "--gate-hidden-dim", "16", "--batch-size", "1", "--grad-accum", "1",
        "--warmup-steps", "2", "--lr", "1e-3", "--no-progress", "--no-tensorboard"]


def train(output, *args, data=None, cache=None):
    """Run trainer/train.py in this process; returns (exit code, output folder)."""
    argv = TINY + ["--output", str(output), "--demo-images", "6", *map(str, args)]
    if data is not None:
        argv += ["--data", str(data)]
    if cache is not None:
        argv += ["--cache-dir", str(cache)]
    return main(argv), Path(output)


def gates(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_gates(a, b, atol=0.0):
    a, b = gates(a), gates(b)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) <= atol


def max_difference(a, b):
    a, b = gates(a), gates(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


pytestmark = pytest.mark.usefixtures("one_thread")


ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("shapes"), 6, seed=3)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, dataset, shared_cache):
    """8 steps in one run: the gates resume and SIGTERM must reach."""
    code, out = train(tmp_path_factory.mktemp("reference"), "--steps", 8, "--save-every", 100, data=dataset,
                      cache=shared_cache)
    assert code == 0
    return out / "maskattn_demo.safetensors"


# -- end to end ------------------------------------------------------------------------------

def test_demo_trains_finite_loss_changes_gates_and_the_loader_uses_them(tmp_path, dataset, shared_cache, pack,
                                                                        gate_folder):
    code, out = train(tmp_path / "run", "--steps", 4, "--install", data=dataset, cache=shared_cache)
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert all(math.isfinite(m["grad_norm"]) for m in metrics)

    trained = load_gate_file(out / "maskattn_demo.safetensors")
    model = tiny_unet(0).clone()  # the demo's UNet
    initial = GateSet.create(MaskAttnConfig(gate_hidden_dim=16), require_sdxl(model), seed=42)
    change = max(float((a - b).detach().abs().max()) for a, b in zip(trained.parameters(), initial.parameters()))
    assert change > 1e-4
    assert trained.provenance["kind"] == "trained" and trained.provenance["steps"] == 4
    assert trained.provenance["dataset_size"] == 6 and len(trained.provenance["dataset_sha256"]) == 64
    assert (out / "config.yaml").is_file()

    # --install wrote it into models/maskattn: the Loader lists it, loads it, and the sampler output changes.
    assert (gate_folder / "maskattn_demo.safetensors").is_file()
    gated = pack["MaskAttnLoader"].execute(model, "maskattn_demo.safetensors", 1.0, 0.0, 1.0).result[0]
    kwargs = dict(positive=tiny_conditioning(1, seed=1), negative=tiny_conditioning(1, seed=2))
    shape = (1, 4, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    plain = comfy.sample.sample(model, noise, 1, 5.0, "euler", "normal", latent_image=torch.zeros(shape), seed=0,
                                disable_pbar=True, **kwargs)
    masked = comfy.sample.sample(gated, noise, 1, 5.0, "euler", "normal", latent_image=torch.zeros(shape), seed=0,
                                 disable_pbar=True, **kwargs)
    assert float((plain - masked).abs().max()) > 1e-4


# -- the loss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("v_prediction", [False, True], ids=["eps", "v"])
def test_loss_equals_hand_computed_noise_prediction_mse(v_prediction):
    model = build_sdxl_model(seed=0, v_prediction=True) if v_prediction else tiny_unet(0).clone()
    for p in model.model.parameters():
        p.requires_grad_(False)
    gate_set = GateSet.create(MaskAttnConfig(gate_hidden_dim=16), require_sdxl(model), seed=1)
    patched = apply_maskattn(model, gate_set)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    context, y = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g)
    t = torch.tensor([37, 804])

    # SDXL's schedule from first principles: betas linear in sqrt between 0.00085 and 0.012, 1000 steps.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, 0)[t].float().view(2, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0 if v_prediction else noise
    with torch.no_grad():
        output = patched.model.diffusion_model(x_t, t.float(), context=context, y=y,
                                               transformer_options=dict(patched.model_options["transformer_options"]))
    by_hand = float(((output - target) ** 2).mean())

    sigma = ((1 - alpha_bar) / alpha_bar).sqrt().flatten()
    loss = noise_prediction_loss(patched, "v" if v_prediction else "eps", x0, noise, sigma, context, y)
    assert loss.requires_grad
    assert abs(float(loss.detach()) - by_hand) <= 1e-5 * by_hand
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gate_set.parameters())
    assert all(p.grad is None for p in model.model.parameters())


def test_sdxl_size_conditioning_and_long_prompts_batch_as_comfyui_does():
    from trainer.data import SizeConditioning

    model = tiny_unet(0).clone()
    pooled = torch.randn(2, 1280)
    sizes = [SizeConditioning((640, 480), (16, 0), (512, 512)), SizeConditioning((512, 512), (0, 0), (512, 512))]
    y = sdxl_adm(model.model, pooled, sizes)
    assert y.shape == (2, 2816)
    one = model.model.encode_adm(pooled_output=pooled[:1], width=640, height=480, crop_w=16, crop_h=0,
                                 target_width=512, target_height=512)
    assert torch.equal(y[:1], one)
    stacked = stack_contexts([torch.randn(77, 2048), torch.randn(154, 2048)])
    assert stacked.shape == (2, 154, 2048) and torch.equal(stacked[0, :77], stacked[0, 77:])


def test_gradient_checkpointing_gives_the_same_gradients():
    g = torch.Generator().manual_seed(0)
    x0, noise, context, y = (torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g),
                             torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g))
    sigma = torch.tensor([0.5, 3.0])
    grads = []
    for checkpointing in (False, True):
        model = build_sdxl_model(seed=0) if checkpointing else tiny_unet(0).clone()  # checkpointing changes the UNet
        for p in model.model.parameters():
            p.requires_grad_(False)
        gate_set = GateSet.create(MaskAttnConfig(gate_hidden_dim=16), require_sdxl(model), seed=1)
        patched = apply_maskattn(model, gate_set)
        if checkpointing:
            enable_gradient_checkpointing(patched)
        noise_prediction_loss(patched, "eps", x0, noise, sigma, context, y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in gate_set.parameters()]))
    assert float(grads[0].abs().max()) > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * float(grads[0].abs().max()))


# -- never lose work --------------------------------------------------------------------------

def test_stop_then_resume_gives_the_same_gates_as_one_run(tmp_path, dataset, shared_cache, reference_run):
    code, out = train(tmp_path / "split", "--steps", 8, "--stop-at", 4, "--save-every", 100, data=dataset,
                      cache=shared_cache)
    assert code == 0 and not (out / "maskattn_demo.safetensors").exists()
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["step-00000004"]
    # The checkpoint's gate file is one the Loader reads as it is.
    load_gate_file(out / "checkpoints" / "step-00000004" / "gates.safetensors")
    code, _ = train(out, "--steps", 8, "--save-every", 100, "--resume", data=dataset, cache=shared_cache)
    assert code == 0
    assert same_gates(out / "maskattn_demo.safetensors", reference_run)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_resume(tmp_path, dataset, shared_cache, reference_run, capsys):
    code, out = train(tmp_path / "cut", "--steps", 8, "--stop-at", 4, "--save-every", 100, data=dataset,
                      cache=shared_cache)
    assert code == 0
    with open(out / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 5, "loss": 1.27, "lr": 0.0')  # killed mid-write
    capsys.readouterr()
    code, _ = train(out, "--steps", 8, "--save-every", 100, "--resume", data=dataset, cache=shared_cache)
    assert code == 0
    assert "metrics.jsonl: dropped 1 damaged line(s)" in capsys.readouterr().err
    assert same_gates(out / "maskattn_demo.safetensors", reference_run)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_falls_back_past_a_truncated_newest_checkpoint_and_says_so(tmp_path, dataset, shared_cache,
                                                                          reference_run, capsys):
    code, out = train(tmp_path / "damaged", "--steps", 8, "--stop-at", 4, "--save-every", 2, data=dataset,
                      cache=shared_cache)
    assert code == 0
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["step-00000002", "step-00000004"]
    state = out / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    code, _ = train(out, "--steps", 8, "--save-every", 2, "--resume", data=dataset, cache=shared_cache)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "checkpoint step-00000004 cannot be read" in err and "resuming from step-00000002" in err
    assert "resumed from" in err and "step-00000002 at step 2" in err
    assert "set the unreadable checkpoint aside" in err and (out / "checkpoints" / "step-00000004.damaged").is_dir()
    assert same_gates(out / "maskattn_demo.safetensors", reference_run)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    checkpoints.load_checkpoint(out / "checkpoints" / "step-00000004")  # written again, whole, on the way


def test_validation_writes_samples_and_mask_grids_without_changing_training(tmp_path, dataset, shared_cache,
                                                                          reference_run):
    import numpy
    from PIL import Image

    code, out = train(tmp_path / "validated", "--steps", 8, "--save-every", 100, "--validate-every", 4,
                      "--validate-sampler-steps", 2, data=dataset, cache=shared_cache)
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if "validation_error" in r]
    validations = [r for r in records if "validation" in r]
    assert [r["step"] for r in validations] == [4, 8]
    captions = {p.read_text() for p in dataset.rglob("*.txt")}
    for record in validations:
        folder = out / "validation" / f"step-{record['step']:08d}"
        assert sorted(p.name for p in folder.iterdir()) == [f"prompt-{i:02d}-{kind}.png" for i in (0, 1)
                                                            for kind in ("mask-grid", "samples")]
        assert [e["prompt"] for e in record["validation"]] == [e["prompt"] for e in validations[0]["validation"]]
        assert len({e["prompt"] for e in record["validation"]}) == 2 and {e["prompt"] for e in record["validation"]} <= captions
        for entry in record["validation"]:
            assert Path(entry["samples"]).parent == folder and Path(entry["mask_grid"]).is_file()
            with Image.open(entry["samples"]) as picture:  # without gates | 4 px gap | with gates
                assert picture.size == (2 * 32 + 4, 32)
                pixels = torch.from_numpy(numpy.asarray(picture.convert("RGB")).copy())
            assert not torch.equal(pixels[:, :32], pixels[:, 36:])  # the gates change the sample
            with Image.open(entry["mask_grid"]) as picture:
                assert picture.size[0] > 32 and picture.size[1] > 32

    # Bit-identical gates, and the same saved RNG state, as the same 8 steps without validation.
    assert same_gates(out / "maskattn_demo.safetensors", reference_run)
    mine = torch.load(out / "checkpoints" / "step-00000008" / "state.pt", weights_only=False)["rng"]
    theirs = torch.load(reference_run.parent / "checkpoints" / "step-00000008" / "state.pt", weights_only=False)["rng"]
    assert torch.equal(mine["torch"], theirs["torch"]) and tuple(mine["python"]) == tuple(theirs["python"])

    config = parse_config(["--demo", "--validate-every", "5", "--validate-prompts", "a cat", "a dog"])
    assert (config.validate_every, config.validate_prompts, config.validate_sampler_steps) == (5, ("a cat", "a dog"), 8)
    assert parse_config(["--demo"]).validate_every == 0
    with pytest.raises(ConfigError, match="validate_every"):
        parse_config(["--demo", "--validate-every", "-1"])


def test_sigterm_writes_a_checkpoint_that_resumes_to_the_same_gates(tmp_path, dataset, shared_cache, reference_run):
    out = tmp_path / "killed"
    argv = TINY + ["--output", str(out), "--steps", 8, "--save-every", 100, "--data", str(dataset),
                   "--cache-dir", str(shared_cache)]
    process = subprocess.Popen([sys.executable, str(REPO / "trainer" / "train.py"), *map(str, argv)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert "interrupted at step" in stderr and "--resume" in stderr
    saved = checkpoints.latest_checkpoint(out)
    assert saved is not None and 2 <= int(saved.name.split("-")[1]) < 8
    code, _ = train(out, "--steps", 8, "--save-every", 100, "--resume", data=dataset, cache=shared_cache)
    assert code == 0
    assert same_gates(out / "maskattn_demo.safetensors", reference_run)


def test_checkpoints_keep_the_last_k_and_a_full_disk_leaves_the_last_good_one(tmp_path, monkeypatch):
    model = tiny_unet(0)
    gate_set = GateSet.create(MaskAttnConfig(gate_hidden_dim=8), require_sdxl(model), seed=1)
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(tmp_path, step, gate_set, {"step": step}, keep_last=2)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(checkpoints.CheckpointError, match="No space left on device.*step-00000003 is intact"):
        checkpoints.save_checkpoint(tmp_path, 4, gate_set, {"step": 4}, keep_last=2)
    monkeypatch.undo()
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-00000003"
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    restored, state = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(tmp_path))
    assert state["step"] == 3 and same_gates(checkpoints.latest_checkpoint(tmp_path) / "gates.safetensors",
                                             tmp_path / "checkpoints" / "step-00000002" / "gates.safetensors")


# -- caches -----------------------------------------------------------------------------------

def test_second_run_encodes_nothing_and_an_edited_caption_reencodes_one(tmp_path):
    data = write_demo_dataset(tmp_path / "data", 5, seed=7)
    captions = {p.read_text() for p in data.rglob("*.txt")}
    for run in range(3):
        if run == 2:
            edited = sorted(data.rglob("*.txt"))[0]
            edited.write_text("a purple hexagon on a grey background")
        code, out = train(tmp_path / f"run{run}", "--steps", 1, data=data, cache=tmp_path / "cache")
        assert code == 0
        encoded = json.loads((out / "run.json").read_text())["encode"]
        if run == 0:
            assert encoded["latents_encoded"] == 5 and encoded["texts_encoded"] == len(captions)
        elif run == 1:
            assert encoded["latents_encoded"] == 0 and encoded["texts_encoded"] == 0
            assert encoded["latents_cached"] == 5
        else:
            assert encoded["latents_encoded"] == 0 and encoded["texts_encoded"] == 1


# -- more than one process ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path, dataset, shared_cache):
    # float64 UNet, so that only the gates' float32 arithmetic differs between the runs. The paper's learning rate.
    common = TINY + ["--steps", 2, "--grad-accum", 2, "--save-every", 100, "--data", str(dataset), "--precision", "fp64",
                     "--lr", "1e-4", "--cache-dir", str(shared_cache)]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(REPO / "trainer" / "train.py"), *map(str, common),
                          "--output", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=150, env=ONE_THREAD)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    code = main([*map(str, common), "--batch-size", "2", "--output", str(tmp_path / "one")])
    assert code == 0
    ddp_steps, one_steps = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                            for run in ("ddp", "one"))
    parameters = sum(p.numel() for p in load_gate_file(tmp_path / "one" / "maskattn_demo.safetensors").parameters())

    # Both runs sum the same per-sample float32 gate gradients, in another order (one backward pass over a
    # batch of 2, or two averaged by all_reduce): each element differs by float32 rounding, about one unit
    # roundoff u = 2**-24 of what it sums, and such differences add like a random walk over the norm's
    # elements: sqrt(parameters) * u (1.6e-5 here; measured up to 1.1e-7 over seeds 4, 7, 42). A rank
    # average that is off by a constant (a sum, a division by the wrong count), which AdamW and clipping
    # hide in the gates, is off by that factor here.
    u = 2.0 ** -24
    gradient_tolerance = math.sqrt(parameters) * u
    assert [r["step"] for r in ddp_steps] == [r["step"] for r in one_steps] == [1, 2]
    for mine, theirs in zip(ddp_steps, one_steps):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=16 * u)  # the same samples, noise and timesteps
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=gradient_tolerance)
        assert mine["grad_norm_by_stage"].keys() == theirs["grad_norm_by_stage"].keys() == {"mid"}

    # Adam divides each element by |g| + eps (1e-8): an element whose gradient is zero but for rounding
    # (|g| ~ 1e-10) moves by up to lr * |dg| / eps, in opposite directions in the two runs, and that is
    # bounded only by the step itself, 2 * lr (seeds 4 and 7 put 1.4e-6 and 4.1e-6 there). So the gates
    # agree to within the sum over steps of 2 * lr (warm-up included), and the gradients above carry the
    # fine comparison.
    lrs = [r["lr"] for r in one_steps]
    difference = max_difference(tmp_path / "ddp" / "maskattn_demo.safetensors",
                                tmp_path / "one" / "maskattn_demo.safetensors")
    assert difference <= 2 * sum(lrs), difference
    # ... while training moved them by about lr per step.
    initial = GateSet.create(MaskAttnConfig(gate_hidden_dim=16), require_sdxl(tiny_unet(0)), seed=42)
    trained = load_gate_file(tmp_path / "one" / "maskattn_demo.safetensors")
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(trained.parameters(), initial.parameters()))
    assert moved > 0.5 * sum(lrs)


# -- bad input ----------------------------------------------------------------------------------

def test_corrupt_images_and_missing_captions_are_skipped_and_counted(tmp_path, capsys):
    data = write_demo_dataset(tmp_path / "data", 4, seed=1)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "broken.txt").write_text("a broken picture")
    (data / "truncated.jpg").write_bytes(next(data.rglob("*.png")).read_bytes()[:60])
    (data / "truncated.txt").write_text("half a picture")
    (data / "nocaption.png").write_bytes(next(data.rglob("*.png")).read_bytes())
    (data / "empty.png").write_bytes(next(data.rglob("*.png")).read_bytes())
    (data / "empty.txt").write_text("   \n")
    code, out = train(tmp_path / "run", "--steps", 1, data=data)
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["examples"] == 4
    assert run["skipped"] == {"missing caption": 1, "empty caption": 1, "corrupt image": 2}
    assert "skipped 4" in capsys.readouterr().err

    code, _ = train(tmp_path / "strict", "--steps", 1, "--bad-images", "fail", data=data)
    assert code == 1
    assert "corrupt image" in capsys.readouterr().err
    code, _ = train(tmp_path / "strict2", "--steps", 1, "--bad-captions", "fail", data=data)
    err = capsys.readouterr().err
    assert code == 1 and "caption for image" in err and "--bad-captions skip" in err


def test_no_usable_examples_says_why(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"junk")
    (tmp_path / "data" / "a.txt").write_text("junk")
    code, _ = train(tmp_path / "run", "--steps", 1, data=tmp_path / "data")
    err = capsys.readouterr().err
    assert code == 1 and "no usable training examples" in err and "1 corrupt image" in err


def test_unwritable_output_folder_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _ = train(blocker / "out", "--steps", 1)
    err = capsys.readouterr().err
    assert code == 1 and "is not writable" in err and str(blocker / "out") in err


def test_a_checkpoint_that_is_not_sdxl_is_refused(tmp_path, capsys):
    import comfy.supported_models

    sd15 = comfy.supported_models.SD15({"model_channels": 32, "in_channels": 4, "out_channels": 4,
                                        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "context_dim": 768,
                                        "transformer_depth": [1, 1, 1, 1], "transformer_depth_output": [1] * 6,
                                        "transformer_depth_middle": 1, "num_heads": 2, "use_linear_in_transformer": False,
                                        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
                                        "use_temporal_attention": False, "use_temporal_resblock": False,
                                        "image_size": 32})
    patcher = comfy.model_patcher.ModelPatcher(sd15.get_model({}), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(BaseModelError, match="sd15.safetensors is not an SDXL checkpoint.*768"):
        check_sdxl(patcher, "sd15.safetensors")

    junk = tmp_path / "junk.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(junk))
    code = main(["--checkpoint", str(junk), "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "junk.safetensors" in err and ("cannot load" in err or "not an SDXL" in err)


def test_config_files_and_flags(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('checkpoint = "base.safetensors"\ndata = "images"\nlr = 5e-5\nbetas = [0.8, 0.99]\n'
                    'stage = "high"\n')
    config = parse_config(["--config", str(toml), "--lr", "2e-4"])
    assert (config.lr, config.betas, config.stage, config.batch_size, config.grad_accum) == (2e-4, (0.8, 0.99),
                                                                                            "high", 2, 8)
    paper = parse_config(["--checkpoint", "x", "--data", "y"])
    assert (paper.stage, paper.placement, paper.threshold, paper.negative_value, paper.gate_hidden_dim,
            paper.warmup_steps, paper.grad_clip, paper.resolution, paper.seed) == (
        "mid", "encoder_decoder", 0.5, -10000.0, 128, 1000, 1.0, 512, 42)
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("demo: true\nleraning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config keys \\['leraning_rate'\\]"):
        parse_config(["--config", str(yaml_file)])
    with pytest.raises(ConfigError, match="argument --stage: invalid choice: 'middle'"):
        parse_config(["--demo", "--stage", "middle"])
    bad_stage = tmp_path / "bad_stage.toml"
    bad_stage.write_text('demo = true\nstage = "middle"\n')
    with pytest.raises(ConfigError, match="stage must be one of"):
        parse_config(["--config", str(bad_stage)])
    with pytest.raises(ConfigError, match="--checkpoint and --data are required"):
        parse_config([])


def test_jsonl_and_coco_sources(tmp_path):
    data = write_demo_dataset(tmp_path / "data", 2, seed=0)
    images = sorted(data.rglob("*.png"))
    lines = [json.dumps({"image": str(images[0].relative_to(tmp_path)), "caption": "a cat and a dog"}),
             json.dumps({"image": str(images[1].relative_to(tmp_path)), "caption": ""})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    examples, skipped = read_examples(str(tmp_path / "data.jsonl"), "auto", None, 2, "skip")
    assert [e.caption for e in examples] == ["a cat and a dog"] and skipped.counts == {"empty caption": 1}

    coco = {"images": [{"id": 1, "file_name": images[0].name}],
            "annotations": [{"id": 5, "image_id": 1, "caption": "a red ball on a table"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    try:
        import spacy  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs spaCy: pip install spacy"):
            read_examples(str(tmp_path / "captions.json"), "coco", str(images[0].parent), 2, "skip")
    examples, _ = read_examples(str(tmp_path / "captions.json"), "coco", str(images[0].parent), 0, "skip")
    assert examples[0].image == images[0] and examples[0].caption == "a red ball on a table"


def test_batches_are_deterministic_and_share_a_bucket():
    groups = [0, 1, 0, 1, 0, 1, 0, 1, 0]
    first = epoch_batches(groups, 2, seed=42, epoch=0)
    assert first == epoch_batches(groups, 2, seed=42, epoch=0) != epoch_batches(groups, 2, seed=42, epoch=1)
    assert len(first) == 4 and all(len({groups[i] for i in batch}) == 1 for batch in first)


def test_centre_crop_and_aspect_buckets_set_sdxl_size_conditioning(tmp_path):
    from PIL import Image

    from trainer.data import buckets_for, load_image

    Image.new("RGB", (96, 64), (200, 10, 10)).save(tmp_path / "wide.png")
    pixels, size = load_image(tmp_path / "wide.png", 32, buckets=False)
    assert pixels.shape == (32, 32, 3) and 0.0 <= float(pixels.min()) <= float(pixels.max()) <= 1.0
    assert (size.original, size.crop, size.target) == ((96, 64), (8, 0), (32, 32))  # resized to 48x32, centre crop
    pixels, size = load_image(tmp_path / "wide.png", 32, buckets=True)
    assert size.target in buckets_for(32) and size.target[0] > size.target[1]
    assert pixels.shape == (size.target[1], size.target[0], 3)
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in buckets_for(512)) and (512, 512) in buckets_for(512)


def _metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_the_base_loss_is_the_ungated_models_loss_on_the_same_batch(tmp_path, dataset, shared_cache):
    # Gates that start wide open are the unpatched model exactly: at the first step both losses agree to the bit.
    code, out = train(tmp_path / "open", "--steps", "4", "--base-loss-every", "1", "--gate-init-bias", "40",
                      data=dataset, cache=shared_cache)
    assert code == 0
    first = _metrics(out)[0]
    assert first["loss_base"] == first["loss"]
    # Gates that close connections: the base loss is logged every 2 steps, on those steps' batches, and differs.
    code, out = train(tmp_path / "closing", "--steps", "4", "--base-loss-every", "2", "--log-every", "3",
                      data=dataset, cache=shared_cache)
    records = _metrics(out)
    assert [r["step"] for r in records if "loss_base" in r] == [2, 4]
    assert all(r["loss_base"] != r["loss"] and r["loss_base"] > 0 for r in records if "loss_base" in r)
    code, out = train(tmp_path / "open_later", "--steps", "2", "--base-loss-every", "1", "--gate-init-bias", "40",
                      data=dataset, cache=shared_cache)
    assert [r["loss_base"] for r in _metrics(out)] == [r["loss_base"] for r in _metrics(tmp_path / "open")][:2]


def test_a_checkpoint_from_before_the_gate_settings_existed_resumes(tmp_path, dataset, shared_cache):
    code, out = train(tmp_path / "old", "--steps", 4, "--stop-at", 2, "--save-every", 100, data=dataset,
                      cache=shared_cache)
    assert code == 0
    state_path = out / "checkpoints" / "step-00000002" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    for key in ("gate", "gate_init_bias", "base_loss_every"):
        state["config"].pop(key)
    torch.save(state, state_path)
    code, _ = train(out, "--steps", 4, "--save-every", 100, "--resume", data=dataset, cache=shared_cache)
    assert code == 0
    code, _ = train(out, "--steps", 4, "--save-every", 100, "--resume", "--gate", "soft", data=dataset,
                    cache=shared_cache)
    assert code == 1  # a setting that changes the computation still stops a resume
