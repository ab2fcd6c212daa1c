"""A board's install.sh: one template (`devices/install.sh.template`) filled in from its profile.

Everything that differs between boards (apt packages, the runtime wheels and their package index)
lives in the profile's `[install]` table; the shipped boards' install.sh files are this function's
output, committed so a board folder works on its own, and a test keeps them equal to it. A
profile of the user's own needs no install.sh: `edgefl flash` writes one from the template.

Run `python -m edgefl.delivery.install_script` to rewrite the shipped boards' install.sh.
"""

from __future__ import annotations

import shlex

from edgefl.atomic import write_atomic
from edgefl.errors import ProfileError
from edgefl.profiles import DeviceProfile, available_profiles, load_profile
from edgefl.resources import shipped_dir

INSTALL_SCRIPT = "install.sh"
TEMPLATE = "install.sh.template"


def _words(values: list[str]) -> str:
    return " ".join(shlex.quote(v) for v in values)


def _apt_lines(profile: DeviceProfile) -> str:
    apt = profile.install.apt
    if not apt:
        return (
            '    echo "install.sh: $PYTHON has no venv/ensurepip and profile'
            f' {profile.name} names no apt packages for it" >&2\n'
            "    exit 1"
        )
    return f"    apt-get update -qq\n    apt-get install -y -qq {_words(apt)}"


def _runtime_lines(profile: DeviceProfile) -> str:
    spec = profile.install
    if not spec.uninstall and not spec.packages:
        return "# The runtime is what edgefl[agent] brings: onnxruntime and ai-edge-litert."
    lines = [
        "# The board's runtime, from its profile's [install]: what it replaces in edgefl[agent]"
    ]
    lines.append("# and what it adds.")
    # PIP: the template's pip (the venv's, or an offline bundle's shipped wheel).
    uninstall = f'"${{PIP[@]}}" uninstall --quiet --yes {_words(spec.uninstall)}'
    if not spec.packages:
        lines.append(uninstall)
        return "\n".join(lines)
    # The packages come from an extra index (the profile's, or EDGEFL_EXTRA_INDEX_URLS,
    # space-separated, as pip reads PIP_EXTRA_INDEX_URL), or from an offline bundle's wheels/
    # (PIP_INSTALL is then --no-index). Without either the board keeps what edgefl[agent] brings.
    lines += [
        f'EXTRA_INDEX_URLS="${{EDGEFL_EXTRA_INDEX_URLS:-{" ".join(spec.extra_index_urls)}}}"',
        'if [ -n "$EXTRA_INDEX_URLS" ] || [ -d "$HERE/wheels" ]; then',
    ]
    if spec.uninstall:
        lines.append(f"    {uninstall}")
    lines += [
        '    PIP_EXTRA_INDEX_URL="$EXTRA_INDEX_URLS" "${PIP_INSTALL[@]}" ' + _words(spec.packages),
        "else",
        f'    echo "install.sh: no EDGEFL_EXTRA_INDEX_URLS: {_words(spec.packages)} not installed;'
        ' keeping the runtime of edgefl[agent]" >&2',
        "fi",
    ]
    return "\n".join(lines)


def render_install_script(profile: DeviceProfile) -> str:
    """Return the install.sh for a board of `profile`: the template with its values filled in.

    Args:
        profile: the board profile; its `[install]` table and description fill the template.

    Returns:
        The script's text.

    Raises:
        ProfileError: the template is not shipped, or a profile value would break the script.
    """
    for value in (*profile.install.extra_index_urls, profile.description, profile.name):
        if any(ch in value for ch in "\n\"'$`\\"):
            raise ProfileError(f"profile {profile.name}: {value!r} cannot go into install.sh")
    try:
        template = (shipped_dir("devices") / TEMPLATE).read_text()
    except (FileNotFoundError, OSError) as exc:
        raise ProfileError(f"the install.sh template is not shipped: {exc}") from exc
    return (
        template.replace("@PROFILE@", profile.name)
        .replace("@DESCRIPTION@", profile.description or profile.name)
        .replace("@APT@", _apt_lines(profile))
        .replace("@RUNTIME@", _runtime_lines(profile))
    )


def install_script(profile: DeviceProfile) -> bytes:
    """Return the install.sh `edgefl flash` ships: the profile's own file, else the rendered one.

    Raises:
        ProfileError: the profile has no install.sh and the template cannot be filled in.
    """
    own = profile.file(INSTALL_SCRIPT)
    if own.is_file():
        return own.read_bytes()
    return render_install_script(profile).encode()


def write_shipped_install_scripts() -> list[str]:
    """Rewrite every shipped board's install.sh from the template; returns the boards' names."""
    names = available_profiles()
    for name in names:
        profile = load_profile(name)
        write_atomic(profile.file(INSTALL_SCRIPT), render_install_script(profile).encode(), 0o755)
    return names


if __name__ == "__main__":
    print("rewrote install.sh of:", ", ".join(write_shipped_install_scripts()))
