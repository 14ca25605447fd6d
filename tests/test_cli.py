"""The console script: help, one-line errors with exit code 2, and nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "t2tedge.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_lists_commands() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in ("models", "train", "export", "build", "demo"):
        assert command in result.stdout


def test_unknown_model_lists_known_ones(tmp_path: Path) -> None:
    line = _one_line_error(_run("export", "t2t_vit_99", "--output-dir", str(tmp_path / "a")))
    assert "unknown model 't2t_vit_99'" in line and "t2t_vit_7" in line and "mobilenet_v2" in line
    assert not (tmp_path / "a").exists()


def test_bad_image_size_and_bad_checkpoint(tmp_path: Path) -> None:
    line = _one_line_error(_run("export", "t2t_vit_7", "--weights", "random", "--image-size", "40"))
    assert "multiple of 16" in line
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    line = _one_line_error(_run("export", "t2t_vit_7", "--weights", str(bad), "--output-dir", str(tmp_path / "a")))
    assert "not a readable checkpoint" in line
    assert not (tmp_path / "a").exists()


def test_bad_recipe_names_the_field(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: [t2t_vit_7]\nprecisions: fp32\n")
    line = _one_line_error(_run("build", str(recipe)))
    assert "precisions" in line


def test_train_on_empty_folder_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "m.pt"
    line = _one_line_error(
        _run("train", "mobilenet_v3_small", "--dataset", str(tmp_path / "empty"), "--test-dataset",
             str(tmp_path / "empty"), "-o", str(out))
    )  # fmt: skip
    assert "empty" in line or "no usable images" in line
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("command", ["models", "train", "export", "build", "demo"])
def test_every_command_has_help(command: str) -> None:
    result = _run(command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_models_table_shows_counted_and_paper_numbers() -> None:
    result = _run("models", "--no-macs")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 5}
    assert {"t2t_vit_7", "t2t_vit_t_24", "t2t_vit_14_wide", "mobilenet_v3_small"} <= rows.keys()
    cells = [c.strip() for c in rows["t2t_vit_14"].split("│")]
    assert cells[4] == "21.55" and cells[6] == "21.5"  # counted params beside the paper's


_CRASHING_CLI = """
import sys
import t2tedge.cli as cli


@cli.app.command("boom")
def boom(kind: str) -> None:
    errors = {"runtime": RuntimeError("kaput [x]\\nsecond line"), "oserror": PermissionError(13, "Permission denied")}
    raise errors[kind]


cli.main()
"""


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("runtime", "RuntimeError: kaput [x] second line"), ("oserror", "PermissionError: [Errno 13] Permission denied")],
)
def test_internal_error_is_one_line_unless_debugging(kind: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "T2TEDGE_DEBUG"}
    argv = [sys.executable, "-c", _CRASHING_CLI, "boom", kind]
    result = subprocess.run(argv, capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: internal error: {expected} (rerun with T2TEDGE_DEBUG=1 for the traceback)"], lines
    debug = subprocess.run(argv, capture_output=True, text=True, env={**env, "T2TEDGE_DEBUG": "1"}, timeout=120)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and expected.split(":")[0] in debug.stderr


def test_import_t2tedge_registers_the_timm_entrypoints() -> None:
    # The README's promise, in a fresh interpreter: `import t2tedge` is enough, before or after timm.
    for order in ("import t2tedge, timm", "import timm, t2tedge"):
        code = (
            f"{order}\n"
            "model = timm.create_model('t2t_vit_7', num_classes=3)\n"
            "print(type(model).__name__, timm.models.is_model('t2t_vit_14'))\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["T2TViT", "True"], result.stdout
    # and it stays cheap: neither torch nor timm is imported by `import t2tedge` alone
    code = "import sys, t2tedge; print('torch' in sys.modules, 'timm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stdout + result.stderr
