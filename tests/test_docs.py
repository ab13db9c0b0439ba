"""The examples run as written: the Python blocks of the README and docs/ (each file's blocks in
order, in one namespace, as a reader pastes them, in an empty working directory), and the
scripts of examples/ that the README names (.ci/run runs the fine-tuning one). A block that
needs what a reader brings (a checkpoint, a model of their own, a process group) says so in a
comment just above it, `<!-- not run: why -->`, and is left out."""

import pathlib
import re
import sys

import pytest

from conftest import REPOSITORY, run_python, subprocess_env

FILES = ["README.md", *sorted(str(p.relative_to(REPOSITORY)) for p in pathlib.Path(REPOSITORY, "docs").glob("*.md"))]
# the dev extras' packages that examples import; without them those examples cannot run
OPTIONAL = {"transformers", "safetensors"}
BLOCK = re.compile(r"(<!-- not run: (?P<why>.+?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(path: str) -> list[tuple[int, str, str | None]]:
    """(line, code, why it is not run or None) of each Python block in path."""
    text = pathlib.Path(REPOSITORY, path).read_text()
    return [(text.count("\n", 0, m.start("code")), m["code"], m["why"]) for m in BLOCK.finditer(text)]


@pytest.mark.parametrize("path", [f for f in FILES if any(why is None for _, _, why in blocks(f))])
def test_the_examples_run_as_written(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for line, code, why in blocks(path):
        if why is None:
            try:
                # blank lines first, so that a traceback names the line in the file
                exec(compile("\n" * line + code, path, "exec"), namespace)
            except ModuleNotFoundError as exc:
                if exc.name not in OPTIONAL:
                    raise
                pytest.skip(f"{path} imports {exc.name}, which is not installed")


def test_the_quickstart_runs():
    out = run_python(f"import runpy; runpy.run_path({REPOSITORY + '/examples/quickstart.py'!r}, run_name='__main__')",
                     subprocess_env())
    assert "input / output: (4, 64, 512) -> (4, 64, 512)" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun's gloo processes on Linux")
def test_the_expert_parallel_example_runs_on_two_processes():
    code = ("import sys, torch.distributed.run as run; sys.argv = ['torchrun', '--standalone', '--nproc_per_node', "
            f"'2', {REPOSITORY + '/examples/ep_torchrun.py'!r}]; run.main()")
    out = run_python(code, subprocess_env(), timeout=900)
    error = re.search(r"single-process MoE\| over 512 tokens: (\S+)", out)
    assert error and float(error[1]) < 1e-5 and "step 4: loss" in out, out
