"""Reading the deployment recipes as their tools do: a Dockerfile's instructions, a systemd
unit's settings, a Markdown guide's code blocks. Small parsers for the files this repository
ships (the linters, hadolint and systemd-analyze, check the syntax; these read the values)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "config" / "Dockerfile"
UNIT = ROOT / "config" / "synapse-router@.service"  # a template
GUIDE = ROOT / "docs" / "deployment.md"
DOCKER_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Stage:
    """One stage of a Dockerfile: its instructions in order, (NAME, arguments)."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == name]

    def last(self, name: str) -> str:
        found = self.all(name)
        assert found, f"no {name} in the stage FROM {self.base}"
        return found[-1]

    def exec_form(self, name: str) -> list[str]:
        """ENTRYPOINT/CMD in exec (JSON) form; the shell form is refused (signals would reach sh)."""
        value = json.loads(self.last(name))
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{name} is not exec form"
        return value

    def env(self) -> dict[str, str]:
        """ENV KEY=VALUE ... pairs over Docker's default PATH, later ones win; `$NAME` refers to
        an earlier value."""
        env = {"PATH": DOCKER_DEFAULT_PATH}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), "${" + m.group(1) + "}"), value)
        return env

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """HEALTHCHECK's options and its command (exec form)."""
        options, _, command = self.last("HEALTHCHECK").partition(" CMD ")
        opts = dict(o.removeprefix("--").split("=", 1) for o in options.split())
        return opts, json.loads(command)


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    text = re.sub(r"\\\n", " ", path.read_text())  # continuation lines
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr, args = instr.upper(), re.sub(r"\s+", " ", args.strip())
        if instr == "FROM":
            stages.append(Stage(args))
        elif stages:
            stages[-1].instructions.append((instr, args))
    return stages


def unit_settings(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values in order (a key may repeat; an empty value resets it)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            sections.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        values = sections[section].setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def unit_value(name: str, section: str = "Service", path: Path = UNIT) -> str:
    values = unit_settings(path).get(section, {}).get(name)
    assert values, f"{path.name}: no {name}= in [{section}]"
    return values[-1]


def code_blocks(language: str, path: Path = GUIDE) -> list[str]:
    """The fenced code blocks of one language in a Markdown file."""
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.S | re.M)
