"""The README documents every config key the schema defines, and nothing the schema lacks."""

import re

import yaml

from conftest import PROJECT


def schema_keys(schema, prefix=""):
    for key, spec in schema.get("properties", {}).items():
        name = f"{prefix}{key}"
        nested = [k for k in spec.get("properties", {})] if spec.get("type") == "object" else []
        if nested and key != "models":
            yield from schema_keys(spec, f"{name}.")
        else:
            yield name


def test_every_config_key_is_documented():
    schema = yaml.safe_load((PROJECT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    readme = (PROJECT / "README.md").read_text()
    table = re.search(r"## Config keys\n(.*?)\n## ", readme, re.S).group(1)
    documented = set(re.findall(r"^\| `([^`]+)`", table, re.M))
    assert documented == set(schema_keys(schema))


def test_quick_start_has_the_two_commands():
    readme = (PROJECT / "README.md").read_text()
    quick = re.search(r"## Quick start\n(.*?)\n## ", readme, re.S).group(1)
    assert re.findall(r"^make \w+", quick, re.M) == ["make run", "make test"]
