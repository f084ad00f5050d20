"""Fails unless this interpreter is the oldest Python that pyproject.toml's ``requires-python`` allows.

``.ci/run`` runs it in the venv every test then runs in, so the declared floor is the version CI tests:
raise the floor, or run CI on the floor, when they part.

    python .ci/check_python_floor.py [pyproject.toml]
"""

import re
import sys
import tomllib
from pathlib import Path


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "pyproject.toml")
    declared = tomllib.loads(path.read_text(encoding="utf-8"))["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", declared)
    if match is None:
        sys.exit(f"{path}: requires-python {declared!r} is not of the form >=X.Y")
    floor, running = (int(match[1]), int(match[2])), sys.version_info[:2]
    if running != floor:
        sys.exit(
            f"requires-python {declared!r} ({path}) but CI runs Python {running[0]}.{running[1]}: "
            "the floor is untested; run CI on the floor or raise requires-python to this version"
        )
    print(f"Python {running[0]}.{running[1]} is the floor of requires-python {declared!r}")


if __name__ == "__main__":
    main()
