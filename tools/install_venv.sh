#!/usr/bin/env bash
# install_venv.sh PYTHON VENV: create VENV (if absent) and install this project with requirements.lock's versions.
#
# uv installs the ~6.7 GB of wheels (torch is a CUDA build) and byte-compiles them in about 70 s on 2 cores, where pip
# takes about 250 s. Byte-compiling at install matters: with PYTHONDONTWRITEBYTECODE set (as on the CI machines) every
# process would otherwise compile torch, torchvision and Ray from source again, 30 s per import instead of 11 s. uv
# reads neither pip.conf nor PIP_* variables, so pip's configured find-links and extra indexes are passed on. Where uv
# cannot be installed or fails, pip does the same install.
set -euo pipefail
python=$1
venv=$2
py=$venv/bin/python

if [[ ! -x $py ]]; then
  "$python" -m venv "$venv" || {
    echo "error: '$python -m venv $venv' failed. Python 3.11 with venv is required" \
      "(Debian: apt-get install python3.11-venv)."
    exit 1
  }
fi

pip_setting() {  # the environment's PIP_<NAME>, else pip's configured global.<name>, else nothing
  local env_name=PIP_$(tr 'a-z-' 'A-Z_' <<<"$1")
  if [[ -n ${!env_name:-} ]]; then echo "${!env_name}"; else "$py" -m pip config get "global.$1" 2>/dev/null || true; fi
}

install_with_uv() {
  "$py" -m pip install --quiet --disable-pip-version-check 'uv==0.13.9' || return 1
  local name value vars=(UV_INDEX_STRATEGY=unsafe-best-match)
  for name in find-links extra-index-url index-url; do
    value=$(pip_setting "$name" | xargs)  # pip separates several values by spaces or newlines
    [[ $name == find-links ]] && value=${value// /,}  # uv's UV_FIND_LINKS takes them comma-separated
    [[ -n $value ]] && vars+=("UV_$(tr 'a-z-' 'A-Z_' <<<"$name")=$value")
  done
  env "${vars[@]}" "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$py" -c requirements.lock -e '.[dev]'
}

if ! install_with_uv; then
  echo "uv install failed or unavailable; installing with pip (about 4 minutes on 2 cores)"
  "$py" -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
fi
