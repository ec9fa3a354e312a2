"""The Shapes world's commands refuse bad arguments with one argparse line (exit 2) before any work."""

import subprocess
import sys

import pytest

from conftest import REPO
from maskattn_shapes import control, evaluate, study, world


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("argv, says", [
    (["--n", "-5"], "argument --n: must be > 0, got -5"),
    (["--n", "0"], "argument --n: must be > 0, got 0"),
    (["--size", "0"], "argument --size: must be a multiple of 8"),
    (["--size", "100000"], "from 32 to 1024, got 100000"),
    (["--size", "130"], "got 130"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
])
def test_world_refuses_bad_numbers_before_writing(tmp_path, capsys, argv, says):
    assert says in _refused(world.main, [str(tmp_path / "out"), *argv], capsys)
    assert not (tmp_path / "out").exists()


def test_world_refuses_an_output_it_cannot_write(a_file, capsys):
    assert "out_dir" in _refused(world.main, [str(a_file / "sub"), "--n", "2"], capsys)
    assert "/proc/maskattn-world" in _refused(world.main, ["/proc/maskattn-world", "--n", "2"], capsys)


def test_world_writes_at_the_smallest_size(tmp_path):
    world.main([str(tmp_path / "w"), "--n", "3", "--size", "32"])
    assert len(list((tmp_path / "w").glob("*.png"))) == 3


@pytest.mark.parametrize("argv, says", [
    (["--n", "0"], "argument --n: must be > 0, got 0"),
    (["--n", "-3"], "argument --n: must be > 0, got -3"),
    (["--noise-sd", "nan"], "argument --noise-sd: must be finite, got nan"),
    (["--noise-sd", "-1"], "argument --noise-sd: must be >= 0, got -1"),
    (["--seed", "-2"], "argument --seed: must be >= 0"),
])
def test_evaluate_refuses_bad_numbers(capsys, argv, says):
    assert says in _refused(evaluate.main, argv, capsys)


@pytest.fixture
def no_sampling(monkeypatch):
    """The study's work starts with the base checkpoint: a test that reaches it has failed."""
    from maskattn_comfy import host
    from maskattn_shapes import model

    def began(*args, **kwargs):
        raise AssertionError("the study began its work before refusing its arguments")

    monkeypatch.setattr(model, "load_shapes_checkpoint", began)
    monkeypatch.setattr(host, "boot", began)


@pytest.mark.parametrize("argv, says", [
    (["--per-kind", "0"], "argument --per-kind: must be > 0, got 0"),
    (["--batch", "0"], "argument --batch: must be > 0, got 0"),
    (["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
    (["--steps", "0"], "argument --steps: must be > 0, got 0"),
    (["--cfg", "nan"], "argument --cfg: must be finite"),
])
def test_study_refuses_bad_numbers(capsys, no_sampling, argv, says):
    assert says in _refused(study.main, argv, capsys)


def test_study_refuses_an_unwritable_out_before_any_work(a_file, capsys, no_sampling):
    assert f"--out {a_file / 'study'}: cannot write there" in _refused(study.main, ["--out", str(a_file / "study")], capsys)


def test_study_reads_every_gate_and_control_file_before_sampling(tmp_path, capsys, no_sampling):
    from maskattn_shapes import model

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(model.GATES.joinpath("shapes_gates.safetensors").read_bytes()[:5000])
    out = ["--out", str(tmp_path / "study")]
    line = _refused(study.main, ["--gates", str(model.GATES / "shapes_gates.safetensors"), str(corrupt), *out], capsys)
    assert f"--gates {corrupt}:" in line and "truncated or corrupt" in line
    assert "no such file" in _refused(study.main, ["--gates", str(tmp_path / "none.safetensors"), *out], capsys)
    line = _refused(study.main, ["--gates", "--control", str(model.GATES / "shapes_gates.safetensors"), *out], capsys)
    assert "is not a Shapes control file" in line


def test_control_without_arguments_is_one_line_and_exit_2(capsys):
    assert control.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --checkpoint and --data are required (or --demo to try the built-in tiny model)"]


def test_control_with_a_missing_checkpoint_is_one_line_and_exit_1(tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path / "none.safetensors"), "--data", str(tmp_path), "--output", str(tmp_path / "o")]
    assert control.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --checkpoint") and "none.safetensors" in err[0]


def test_control_demo_trains_the_tiny_model_and_writes_a_control_file(tmp_path):
    argv = ["--demo", "--demo-images", "4", "--steps", "1", "--base-loss-every", "0", "--output", str(tmp_path)]
    assert control.main(argv) == 0
    written = control.ControlSet.load(tmp_path / "maskattn_demo.safetensors")
    assert written.rank >= 1 and written.layer_heads


def test_the_module_commands_exit_2_with_one_line():
    for module, argv in (("maskattn_shapes.world", ["/tmp/x", "--n", "-5"]), ("maskattn_shapes.evaluate", ["--n", "0"])):
        run = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.strip().splitlines()[-1].endswith(
            "must be > 0, got " + argv[-1]), run.stderr
