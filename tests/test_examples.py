"""The README's examples are the files in examples/, quoted verbatim, and they run: the in-process
example here on the tiny model, the client and CLI examples against a running service in
test_services.py."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from conftest import TEXT, tiny_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def main_body(path: Path) -> str:
    """The body of an example's main(), dedented: what the README quotes."""
    source = path.read_text()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    return textwrap.dedent("\n".join(source.splitlines()[main.body[0].lineno - 1:main.end_lineno]))


def shell_body(path: Path) -> str:
    """The commands of a shell example, after its argument handling."""
    return path.read_text().split("book=$1\n\n", 1)[1].rstrip("\n")


def test_the_readme_quotes_the_examples():
    readme = (ROOT / "README.md").read_text()
    for example in ("in_process.py", "client.py"):
        assert main_body(EXAMPLES / example) in readme, example
    assert shell_body(EXAMPLES / "client_cli.sh") in readme


def test_the_in_process_example_runs(tiny_llama_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_llama_dir, init="backbone").to_dict()))
    chapter1, chapter2 = tmp_path / "chapter1.txt", tmp_path / "chapter2.txt"
    chapter1.write_text(TEXT * 6)
    chapter2.write_text(TEXT * 2)
    out = subprocess.run([sys.executable, str(EXAMPLES / "in_process.py"), str(chapter1), str(chapter2),
                          "--config", str(config), "--set", "read.segment_tokens=32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    longmem_ppl, backbone_ppl = map(float, lines[0].split())
    assert longmem_ppl > 1 and backbone_ppl > 1
    assert len(lines) >= 4  # choices, generated text, at least one retrieved span
