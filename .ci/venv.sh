# Source this file: it builds (once) and activates the project's virtual environment.
# The environment is cached under ~/.cache/clue-venv, keyed by a hash of the requirement files,
# so a change to either file builds a fresh one and an unchanged checkout reuses it.
_clue_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_clue_hash="$(cat "$_clue_root/requirements.txt" "$_clue_root/requirements-dev.txt" | sha256sum | cut -c1-16)"
_clue_venv="${CLUE_VENV:-$HOME/.cache/clue-venv/$_clue_hash}"
if [ ! -f "$_clue_venv/.complete" ]; then
    echo "building the virtual environment in $_clue_venv (first run only; torch is large)"
    rm -rf "$_clue_venv"
    python3 -m venv "$_clue_venv"
    "$_clue_venv/bin/python" -m pip install -q --upgrade pip
    "$_clue_venv/bin/python" -m pip install -q -r "$_clue_root/requirements-dev.txt"
    touch "$_clue_venv/.complete"
fi
# shellcheck disable=SC1091
source "$_clue_venv/bin/activate"
