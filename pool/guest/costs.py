"""The cost profile: seconds per counted operation, per platform, from TOML.

Counts are the model's primary output; modeled time is counts times these
figures. The shipped defaults (costs.toml, each with its source) are orders of
magnitude only; users pass their own measured file.

The platforms are pool.guest.platform's registry (PLATFORM_SPECS); costs.toml has one
section per platform (a test checks both lists agree). This module reads the sections
rather than importing the registry, because the platform imports the cost profile.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import attrs


def _defaults() -> dict[str, dict[str, float]]:
    text = resources.files("pool.guest").joinpath("costs.toml").read_text()
    return {k: dict(v) for k, v in tomllib.loads(text).items() if isinstance(v, dict)}


@attrs.frozen
class CostProfile:
    hypercall_seconds: float
    accept_4k_seconds: float
    accept_2m_seconds: float
    accept_1g_seconds: float
    cache_flush_page_seconds: float
    tlb_flush_seconds: float
    split_seconds: float
    zero_page_seconds: float

    @classmethod
    def load(cls, platform: str, path: str | Path | None = None) -> CostProfile:
        """The profile for `platform`: the shipped defaults, overridden key by key by `path`."""
        defaults = _defaults()
        if platform not in defaults:
            raise ValueError(
                f"unknown platform {platform!r}: expected one of {', '.join(defaults)}"
            )
        table = dict(defaults[platform])
        if path is not None:
            try:
                user = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ValueError(f"cost profile {path}: {exc}") from exc
            section = user.get(platform, {})
            if not isinstance(section, dict):
                raise ValueError(f"cost profile {path}: [{platform}] must be a table")
            for key, value in section.items():
                if key not in table:
                    raise ValueError(f"cost profile {path}: unknown key {platform}.{key}")
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"cost profile {path}: {platform}.{key} must be a number >= 0")
                table[key] = float(value)
        return cls(**{k: float(v) for k, v in table.items()})

    def as_json(self) -> dict[str, float]:
        """The profile's figures by key (compare's config reports the profile in force)."""
        return attrs.asdict(self)


def profile_platforms() -> tuple[str, ...]:
    """The platforms costs.toml has a section for (checked against the registry)."""
    return tuple(_defaults())
