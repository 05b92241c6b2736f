# Sourced by the tools/*.sh scripts: the repository root and the Python interpreter they all use.
# PYTHON wins; otherwise an active virtualenv's python; otherwise python3.
DAVIT_MM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  DAVIT_MM_PYTHON=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  DAVIT_MM_PYTHON="$VIRTUAL_ENV/bin/python"
else
  DAVIT_MM_PYTHON=python3
fi
export DAVIT_MM_ROOT DAVIT_MM_PYTHON

# davit_mm_is_integer_in VALUE MIN MAX: true when VALUE is a decimal integer from MIN to MAX written
# without sign or leading zeros ("08" and "00" are refused, not read as 8 and 0). The digits are
# counted before bash compares numbers, so a value of any length is refused without an overflow.
davit_mm_is_integer_in() {
  case "$1" in
    ''|*[!0-9]*|0?*) return 1 ;;
  esac
  [ "${#1}" -le "${#3}" ] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]
}

# davit_mm_require_integer NAME VALUE MIN MAX [NOTE]: unless davit_mm_is_integer_in VALUE MIN MAX,
# print `error: NAME=VALUE (NOTE): accepted an integer from MIN to MAX` and exit 2.
davit_mm_require_integer() {
  davit_mm_is_integer_in "$2" "$3" "$4" && return 0
  local shown=$2
  case "$2" in ''|*[!0-9]*) shown="'$2'" ;; esac
  printf 'error: %s=%s%s: accepted an integer from %s to %s%s\n' "$1" "$shown" "${5:+ ($5)}" "$3" "$4" \
    "$(case "$2" in 0?*) echo ', written without leading zeros' ;; esac)" >&2
  exit 2
}
