"""Rewrite the second section of constraints-colab.txt (used by `make constraints-colab`).

    python .ci/colab_constraints.py head > FILE      # section 1 only (Colab's own list)
    pip freeze | python .ci/colab_constraints.py write

Section 1 (everything above the line that starts with "# -- resolved") is Colab's published
list and is kept as it is; section 2 becomes the frozen versions of every other package,
without torch (which comes from constraints.txt) and without the package itself.
"""
import re
import sys
from pathlib import Path

FILE = Path(__file__).resolve().parent.parent / "constraints-colab.txt"
MARK = "# -- resolved"


def _name(line: str) -> str:
    return re.split(r"[=<>!~ ]", line, maxsplit=1)[0].strip().lower().replace("_", "-")


def main(cmd: str) -> None:
    lines = FILE.read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith(MARK))
    head = lines[:cut]
    if cmd == "head":
        print("\n".join(head))
        return
    if cmd != "write":
        sys.exit(f"unknown command {cmd!r}: use 'head' or 'write'")
    comments = []
    for line in lines[cut:]:
        if not line.startswith("#"):
            break
        comments.append(line)
    taken = {_name(line) for line in head if line and not line.startswith("#")}
    taken |= {"torch", "genart-utils"}
    frozen = [line.strip() for line in sys.stdin
              if line.strip() and not line.startswith("#") and _name(line) not in taken]
    FILE.write_text("\n".join(head + comments + sorted(frozen, key=str.lower)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
