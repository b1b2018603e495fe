# apt_need <command-or-path> <package>: installs a Debian package when the command or
# path is missing. Sourced by the benchmark scripts.
apt_need() { # apt_need <command-or-path> <package>
  if ! command -v "$1" >/dev/null 2>&1 && [ ! -e "$1" ]; then
    echo "==> installing $2 (Debian)" >&2
    if ! apt-get install -y -qq "$2" >/dev/null; then
      apt-get update -qq && apt-get install -y -qq "$2" >/dev/null
    fi
  fi
}
