"""The README's quick start: the commands it shows are the ones CI runs, and the demo command works."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from mst_clipiqa.cli.commands import command_parser
from mst_clipiqa.internals import option_actions

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def test_quick_start_commands_match_ci():
    blocks = bash_blocks()
    demo, tests = blocks[0], blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    venv = "python3.11 -m venv .venv && . .venv/bin/activate"
    install = 'pip install torch==2.13.0 -e ".[test]"'
    assert tests == f"{venv} && {install} && pytest -q"
    assert install in ci and "\npytest -q\n" in ci
    assert demo == f"{venv} && pip install torch==2.13.0 -e . && mst-clipiqa demo"


def test_the_commands_take_the_options_the_readme_shows():
    """What score, export, benchmark and demo declare, or pass on to the fit (--config, dotted keys)."""
    commands = "\n".join(bash_blocks()).replace("\\\n", " ")  # continued lines joined
    lines = re.findall(r"mst-clipiqa (score|export|benchmark|demo)\b([^#\n]*)", commands)
    assert {command for command, _ in lines} == {"score", "export", "benchmark", "demo"}
    for command, rest in lines:
        declared = option_actions(command_parser(command))
        passed_on = command in ("benchmark", "demo")
        for option in re.findall(r"(?<!\S)--[\w.-]+", rest):
            assert option in declared or (passed_on and (option == "--config" or "." in option)), (command, option)


def test_demo_console_script_runs(demo_command_beside):
    script = shutil.which("mst-clipiqa", path=str(Path(sys.executable).parent))
    assert script, "the console script is installed with the package"
    result = demo_command_beside.result()  # run beside the tests before this one (conftest.py)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"demo test: SRCC -?\d\.\d{4}  PLCC -?\d\.\d{4}", result.stdout), result.stdout[-2000:]
