"""Print pyproject.toml's requirements for the given extras, one per line (for `pip install -r`).

The Dockerfile installs an image's dependencies from these lines before it copies the sources, so that a
change to the code rebuilds one small layer instead of the whole environment.
usage: python requirements.py PYPROJECT [EXTRA ...]
"""

import sys

import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
lines = list(project["dependencies"])
for extra in sys.argv[2:]:
    lines += project["optional-dependencies"][extra]
print("\n".join(lines))
