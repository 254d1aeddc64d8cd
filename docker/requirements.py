"""Prints the pinned requirements of one role (`service` or `worker`): the base dependencies plus
that extra, read from pyproject.toml, so the image installs exactly what `pip install '.[ROLE]'`
would, in a layer that only a pyproject.toml change rebuilds."""

import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extra = sys.argv[1]
for requirement in [*project["dependencies"], *project["optional-dependencies"][extra]]:
    print(requirement)
