"""Prints, one a line, `name==version` for the lower bound of each requirement of pyproject.toml's
extras named on the command line (by default train and test): the versions .ci/oldest_torch.sh
installs, so that CI runs the tests on the oldest set pyproject admits and its bounds stay true.

A requirement without a lower bound (`>=`) is an error: nothing would say which version to test.
A package named by several extras gets the highest of their bounds.

    python .ci/lowest_pins.py [--pyproject PATH] [EXTRA ...]
"""
import argparse
import re
import sys
import tomllib

# name, then the specifiers (no extras, no markers: pyproject's extras need none).
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*$")
LOWER_BOUND = re.compile(r"^>=\s*([0-9][0-9A-Za-z.]*)$")


def version_key(version):
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def lowest_pins(pyproject, extras):
    """{normalised name: lowest version} over the requirements of ``extras``; ValueError naming the
    requirement that has no lower bound, or an extra pyproject does not declare."""
    declared = pyproject.get("project", {}).get("optional-dependencies", {})
    pins = {}
    for extra in extras:
        if extra not in declared:
            raise ValueError(f"pyproject.toml has no extra {extra!r} (it has {sorted(declared)})")
        for requirement in declared[extra]:
            if any(mark in requirement for mark in "[;@"):  # (was "has no lower bound", which it may well have)
                raise ValueError(f"extra {extra!r}: {requirement!r} has extras, a marker or a URL, which this script "
                                 "does not read (name>=VERSION[,...] only)")
            match = REQUIREMENT.match(requirement)
            bounds = [LOWER_BOUND.match(spec.strip()) for spec in match.group(2).split(",")] if match else []
            bounds = [bound.group(1) for bound in bounds if bound]
            if not bounds:
                raise ValueError(f"extra {extra!r}: {requirement!r} has no lower bound (name>=VERSION)")
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            pins[name] = max([pins.get(name, bounds[0]), *bounds], key=version_key)
    return pins


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("extras", nargs="*", default=["train", "test"])
    args = parser.parse_args(argv)
    try:
        with open(args.pyproject, "rb") as f:
            pyproject = tomllib.load(f)
        pins = lowest_pins(pyproject, args.extras)
    except (OSError, tomllib.TOMLDecodeError) as error:
        parser.exit(2, f"lowest_pins.py: --pyproject {args.pyproject}: {error}\n")
    except ValueError as error:
        parser.exit(2, f"lowest_pins.py: {error}\n")
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    sys.exit(main())
