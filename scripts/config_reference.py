"""Print the README's config reference (markdown) from the dataclasses: `python scripts/config_reference.py`."""

from diffalign.config import Config, describe_options
from diffalign.methods import METHODS


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    bar = "\\|"
    lines += [f"| `{k}` | `{d}` | {h.replace('|', bar)} |" for k, d, h in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([r for r in describe_options(Config) if not r[0].startswith("method.")]))
    for name, cls in METHODS.items():
        print(f"\n`method.name: {name}`\n")
        print(table([r for r in describe_options(cls, "method.") if r[0] != "method.name"]))
