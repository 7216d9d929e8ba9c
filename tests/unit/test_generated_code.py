"""The committed gRPC code matches the protos (regenerated and compared byte for byte), and the
protos pass `buf lint`."""

import filecmp
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["as it is", "only the system's"])
def test_generated_code_is_not_stale(tmp_path: Path, monkeypatch, path: str) -> None:
    if path != "as it is":  # `.venv/bin/pytest` run without activating the venv
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
    spec = importlib.util.spec_from_file_location(
        "generate_protos", ROOT / "scripts" / "generate_protos.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate_protos"] = module
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT) for p in (ROOT / "tierwriter").rglob("*_pb2*") if p.is_file()
    )
    assert fresh, "protoc generated nothing"
    assert fresh == committed, (
        "generated files differ from the committed ones (added or removed protos?)"
    )
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"regenerate with `python scripts/generate_protos.py`: {stale}"


def test_buf_lint_with_the_standard_rules_finds_nothing() -> None:
    """The protos follow buf's STANDARD lint rules (buf.yaml): one request and one response
    message per RPC, enums with an UNSPECIFIED zero, names by the style guide."""
    buf = shutil.which("buf") or shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        if os.environ.get("CI"):
            pytest.fail("buf not found: `pip install -e .[test]` installs buf-bin")
        pytest.skip("buf not found: `pip install -e .[test]` installs buf-bin")
    lint = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
