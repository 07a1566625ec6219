"""README's two commands are the ones CI and the demo test run, so README cannot drift from what is tested."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The bash blocks of README's "Two commands" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_shows_setup_then_demo_and_setup_then_tests():
    demo, tests = readme_commands()
    assert demo == "bash scripts/setup.sh && interp demo"
    assert tests == "bash scripts/setup.sh && bash scripts/test.sh"


def test_ci_runs_readmes_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_the_demo_test_runs_readmes_demo_command():
    from tests.test_demo import demo_argv

    assert demo_argv()[:2] == readme_commands()[0].split(" && ")[-1].split()
