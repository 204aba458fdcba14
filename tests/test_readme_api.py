"""README's "Using the package" block holds the package's present names: its lines run, but for the
prediction and the training (which need BGE-M3 from the hub; the lessons and other tests run those)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readmes_package_example_runs_up_to_predicting_and_training():
    block = re.search(r"## Using the package\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    kept = [line for line in block.splitlines() if "predict(" not in line and "train(" not in line
            and "result." not in line]
    assert any("shell_command(config)" in line for line in kept)
    exec("\n".join(kept), {})  # noqa: S102 (the README's own code)
