# Sourced by scripts/main and scripts/test: install Shoal (editable) with the
# extras named in $1 when it or they are missing, using the Python in $PYTHON.
PYTHON=${PYTHON:-python3}
shoal_install() {
  local extras="$1"
  local spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  if ! "$PYTHON" -m pip install --disable-pip-version-check -q -e "$spec"; then
    echo "scripts: 'pip install -e $spec' failed; see the pip output above" >&2
    exit 1
  fi
}
