# Sourced by scripts/main and scripts/test: install Shoal (editable) with the
# extras named in $1 when it or they are missing, using the Python in $PYTHON.
PYTHON=${PYTHON:-python3}

# The Gloo binding (shoal.collective._gloo) builds only against the system's
# libgloo-dev (setup.py leaves it out without the headers), so get it first.
shoal_install_gloo() {
  [ -e /usr/include/gloo/context.h ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts: installing libgloo-dev (apt-get) for the Gloo binding" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev >/dev/null ||
           { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgloo-dev >/dev/null; }; }; then
      echo "scripts: 'apt-get install libgloo-dev' failed; the Gloo binding will not be built" >&2
    fi
  else
    echo "scripts: /usr/include/gloo missing: the Gloo binding will not be built (get it with: apt-get install libgloo-dev)" >&2
  fi
}

shoal_install() {
  local extras="$1"
  local spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  shoal_install_gloo
  if ! "$PYTHON" -m pip install --disable-pip-version-check -q -e "$spec"; then
    echo "scripts: 'pip install -e $spec' failed; see the pip output above" >&2
    exit 1
  fi
}
