# Shared by the benchmark scripts: installs what a benchmark needs when it is missing
# (Debian packages), builds release binaries, and runs tether-bench. Loopback only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

. scripts/bench/apt.sh

# Every plot needs a TrueType font; etcd-client (tether-bench's `etcd` feature, always
# built so the scripts share one build) needs protoc.
apt_need /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf fonts-dejavu-core
apt_need protoc protobuf-compiler

build() {
  echo "==> cargo build --release (tether, tether-sim, tether-bench with etcd)" >&2
  cargo build --release -q -p tether-node -p tether-sim --features tether-sim/etcd
}

bench() { # bench <subcommand> [args…]
  mkdir -p results
  exec ./target/release/tether-bench "$@"
}
