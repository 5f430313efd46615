"""Security floors of the dependencies: what is installed, and what requirements.txt allows."""

from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from chat import checks

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"

# Distribution name -> (lowest safe version, why).
FLOORS = {
    "daphne": (
        "4.2.2",
        "CVE-2026-44545: unbounded WebSocket frame/message size (memory DoS); CVE-2026-44546: "
        "header injection through a Twisted/autobahn parser differential",
    ),
    "django": (
        "5.2.17",
        "latest 5.2 security release in the archive we checked: CVE-2026-15307, CVE-2026-15337, "
        "CVE-2026-15830, CVE-2026-15920 (and 5.2.8: CVE-2025-64459, SQL injection via _connector)",
    ),
    "djangorestframework-simplejwt": (
        "5.5.1",
        "CVE-2024-22513 (GHSA-5vcc-86wm-547q): tokens of deactivated users kept working",
    ),
    "pyjwt": (
        "2.12.0",
        "CVE-2026-32597 (GHSA-752w-5fwx-jx9f): unknown `crit` header extensions were accepted; "
        "CVE-2024-53861: partial `iss` match in 2.10.0",
    ),
    "twisted": (
        "24.7.0",
        "CVE-2024-41671: out-of-order HTTP pipelining responses; CVE-2024-41810: HTML injection "
        "in redirectTo",
    ),
}


def requirement_lower_bounds() -> dict[str, Version]:
    """The `>=` bound of every line of requirements.txt, by normalised distribution name."""
    bounds = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        lower = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
        if lower:
            bounds[requirement.name.lower().replace("_", "-")] = max(lower)
    return bounds


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_installed_version_meets_security_floor(name):
    floor, reason = FLOORS[name]
    installed = Version(version(name))
    assert installed >= Version(floor), f"{name} {installed} < {floor}: {reason}"


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_requirements_lower_bound_meets_security_floor(name):
    floor, reason = FLOORS[name]
    bounds = requirement_lower_bounds()
    assert name in bounds, f"requirements.txt has no lower bound for {name} ({reason})"
    assert bounds[name] >= Version(floor), (
        f"requirements.txt allows {name} {bounds[name]}: {reason}"
    )


@pytest.mark.parametrize(
    ("line", "bound"),
    [
        ("Django>=5.2.17,<5.3            # 5.2 LTS", "5.2.17"),
        ("Twisted[tls]>=24.7", "24.7"),
        ("djangorestframework_simplejwt>=5.5.1,<6", "5.5.1"),
        ("PyJWT==2.15.1", "2.15.1"),
    ],
)
def test_requirement_bounds_are_parsed(tmp_path, monkeypatch, line, bound):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"# comment\n-r other.txt\n{line}\nhttpx\n")
    monkeypatch.setattr(f"{__name__}.REQUIREMENTS", requirements)
    assert list(requirement_lower_bounds().values()) == [Version(bound)]


def test_daphne_floor_matches_system_check():
    """chat.E003 and this file must agree on the daphne floor."""
    assert Version(FLOORS["daphne"][0]).release == checks.DAPHNE_MIN_VERSION
