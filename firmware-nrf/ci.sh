#!/usr/bin/env bash
# CI for the nRF52 firmware (called by scripts/test). Installs what it needs when missing
# and fails loudly, never skips:
#   0. formatting and clippy of the firmware workspace;
#   1. the firmware builds for thumbv7em-none-eabihf in release with TLS on, and without;
#   2. flash (text+rodata+data) fits the active partition of memory/nrf52840.x (embassy-boot's
#      A/B layout: the image must fit it to be updated) and static RAM (data+bss) <= 48 KB,
#      TLS on and a firmware key built in (updates on);
#   3. the QEMU test (qemu-test/: a recorded exchange replayed through DeviceClient and
#      the firmware's HTTP/protobuf/storage code on an emulated Cortex-M4) passes.
# `ci.sh --tools-only` installs and checks the tools (target, QEMU, llvm-size) and stops.
set -euo pipefail
cd "$(dirname "$0")"

TARGET=thumbv7em-none-eabihf
# The budget is the active partition (FLASH) of the board's layout, so the two cannot drift.
FLASH_KIB="$(sed -nE 's/^ *FLASH *: *ORIGIN *= *0x[0-9A-Fa-f]+, *LENGTH *= *([0-9]+)K.*/\1/p' memory/nrf52840.x)"
[ -n "$FLASH_KIB" ] || { echo "firmware-nrf/ci.sh: no FLASH LENGTH in memory/nrf52840.x" >&2; exit 1; }
FLASH_MAX=$((FLASH_KIB * 1024))
# A firmware key (any public key: only the size is measured here), so the build is the one
# that takes updates.
export TETHER_FIRMWARE_KEY=7e2b4d9a1c3f5e7092b4d6f8a0c2e4f6183a5c7e9f1b3d5f7092b4d6f8a0c2e4
RAM_MAX=$((48 * 1024))
QEMU_TIMEOUT_S=120
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
passed=0

ok() {
  echo "firmware-nrf/ci.sh: ok - $*"
  passed=$((passed + 1))
}

fail() {
  echo "firmware-nrf/ci.sh: FAILED - $*" >&2
  echo "firmware-nrf/ci.sh: $passed passed, 1 failed"
  exit 1
}

# --- tools --------------------------------------------------------------------------
if ! rustup target list --installed | grep -qx "$TARGET"; then
  echo "==> installing Rust target $TARGET"
  rustup target add "$TARGET" || fail "cannot install the $TARGET target"
fi

apt_install() {
  apt-get install -y "$@" || { apt-get update && apt-get install -y "$@"; }
}

if ! command -v qemu-system-arm >/dev/null 2>&1; then
  echo "==> installing qemu-system-arm"
  apt_install qemu-system-arm || fail "cannot install qemu-system-arm"
fi

# llvm-size: rustup's llvm-tools if present, else an llvm-size on PATH, else Debian's
# /usr/bin/llvm-size-N. Prints nothing (and succeeds) when there is none: under
# `set -e -o pipefail` a failing lookup must not end the script before the install below.
find_llvm_size() {
  local sysroot host candidate
  sysroot="$(rustc --print sysroot)"
  host="$(rustc -vV | sed -n 's/^host: //p')"
  candidate="$sysroot/lib/rustlib/$host/bin/llvm-size"
  if [ -x "$candidate" ]; then
    echo "$candidate"
    return 0
  fi
  if candidate="$(command -v llvm-size)" && [ -x "$candidate" ]; then
    echo "$candidate"
    return 0
  fi
  for candidate in $(compgen -G '/usr/bin/llvm-size-*' | sort -V -r); do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 0
}
# Debian's llvm provides llvm-size; when the package is installed but the tool is gone (a
# trimmed image), reinstalling it (and its llvm-N) puts the tool back.
install_llvm() {
  local status versioned
  status="$(dpkg-query -W -f='${Status}' llvm 2>/dev/null || true)"
  if [[ "$status" == *"ok installed"* ]]; then
    versioned="$(dpkg-query -W -f='${Depends}' llvm 2>/dev/null | grep -oE 'llvm-[0-9]+' | head -1 || true)"
    echo "==> llvm is installed but provides no llvm-size: reinstalling llvm $versioned"
    apt-get install -y --reinstall llvm $versioned ||
      { apt-get update && apt-get install -y --reinstall llvm $versioned; }
  else
    echo "==> installing Debian's llvm (for llvm-size)"
    apt_install llvm
  fi
}
LLVM_SIZE="$(find_llvm_size)"
if [ -z "$LLVM_SIZE" ]; then
  echo "==> no llvm-size in rustup's llvm-tools, on PATH or as /usr/bin/llvm-size-*"
  install_llvm || fail "no llvm-size, and installing Debian's llvm failed: the size budget \
needs llvm-size (apt-get install llvm, or rustup component add llvm-tools)"
  LLVM_SIZE="$(find_llvm_size)"
fi
[ -n "$LLVM_SIZE" ] || fail "no llvm-size after installing Debian's llvm: the size budget \
needs llvm-size (apt-get install llvm, or rustup component add llvm-tools)"
echo "firmware-nrf/ci.sh: llvm-size is $LLVM_SIZE"
if [ "${1:-}" = "--tools-only" ]; then
  echo "firmware-nrf/ci.sh: tools ready (--tools-only: nothing built)"
  exit 0
fi

# --- build --------------------------------------------------------------------------
echo "==> cargo fmt --check (firmware workspace)"
cargo fmt --all -- --check || fail "cargo fmt: run 'cd firmware-nrf && cargo fmt --all'"
ok "formatting"

echo "==> cargo clippy -D warnings (firmware workspace, TLS on)"
cargo clippy --locked --release --features tls --workspace -- -D warnings || fail "clippy"
ok "clippy"

echo "==> firmware, release, TLS on"
cargo build --locked --release --features tls || fail "firmware build with TLS"
ok "firmware builds for $TARGET (release, tls)"
ELF="$TARGET_DIR/$TARGET/release/tether-firmware-nrf"

# --- size budget (measured on the TLS build, before the plain build overwrites it) --
read -r FLASH RAM < <("$LLVM_SIZE" -A "$ELF" | awk '
  $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" || $1 == ".gnu.sgstubs" { flash += $2 }
  $1 == ".data" { flash += $2; ram += $2 }
  $1 == ".bss" || $1 == ".uninit" { ram += $2 }
  END { print flash + 0, ram + 0 }')
printf 'firmware-nrf/ci.sh: flash %d bytes (%.1f KiB of %d KiB), static RAM %d bytes (%.1f KiB of %d KiB)\n' \
  "$FLASH" "$(echo "$FLASH / 1024" | bc -l)" $((FLASH_MAX / 1024)) \
  "$RAM" "$(echo "$RAM / 1024" | bc -l)" $((RAM_MAX / 1024))
[ "$FLASH" -gt 0 ] && [ "$RAM" -gt 0 ] || fail "could not measure $ELF"
[ "$FLASH" -le "$FLASH_MAX" ] || fail "flash $FLASH bytes exceeds $FLASH_MAX"
ok "flash $FLASH <= $FLASH_MAX bytes"
[ "$RAM" -le "$RAM_MAX" ] || fail "static RAM $RAM bytes exceeds $RAM_MAX"
ok "static RAM $RAM <= $RAM_MAX bytes"

echo "==> bootloader (embassy-boot-nrf), release"
cargo build --locked --release -p tether-bootloader-nrf || fail "bootloader build"
BOOT_ELF="$TARGET_DIR/$TARGET/release/tether-bootloader-nrf"
BOOT_KIB="$(sed -nE 's/^ *BOOTLOADER *: *ORIGIN *= *0x[0-9A-Fa-f]+, *LENGTH *= *([0-9]+)K.*/\1/p' memory/nrf52840.x)"
BOOT_FLASH="$("$LLVM_SIZE" -A "$BOOT_ELF" | awk '
  $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" || $1 == ".data" || $1 == ".gnu.sgstubs" { flash += $2 }
  END { print flash + 0 }')"
[ -n "$BOOT_KIB" ] && [ "$BOOT_FLASH" -gt 0 ] || fail "could not measure the bootloader"
[ "$BOOT_FLASH" -le $((BOOT_KIB * 1024)) ] || fail "bootloader $BOOT_FLASH bytes exceeds its ${BOOT_KIB} KiB"
ok "bootloader $BOOT_FLASH bytes <= ${BOOT_KIB} KiB"

echo "==> firmware, release, plain HTTP (the feature stays additive)"
cargo build --locked --release || fail "firmware build without TLS"
read -r PLAIN_FLASH PLAIN_RAM < <("$LLVM_SIZE" -A "$ELF" | awk '
  $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" || $1 == ".gnu.sgstubs" { flash += $2 }
  $1 == ".data" { flash += $2; ram += $2 }
  $1 == ".bss" || $1 == ".uninit" { ram += $2 }
  END { print flash + 0, ram + 0 }')
printf 'firmware-nrf/ci.sh: plain HTTP build: flash %d bytes (%.1f KiB), static RAM %d bytes\n' \
  "$PLAIN_FLASH" "$(echo "$PLAIN_FLASH / 1024" | bc -l)" "$PLAIN_RAM"
ok "firmware builds without tls"

# --- QEMU test ----------------------------------------------------------------------
echo "==> QEMU test (mps2-an386, Cortex-M4, semihosting)"
cargo build --locked --release -p tether-firmware-qemu-test || fail "QEMU test build"
QEMU_ELF="$TARGET_DIR/$TARGET/release/tether-firmware-qemu-test"
QEMU_LOG="$(mktemp)"
trap 'rm -f "$QEMU_LOG"' EXIT
set +e
timeout "$QEMU_TIMEOUT_S" qemu-system-arm -M mps2-an386 -nographic \
  -semihosting-config enable=on,target=native -kernel "$QEMU_ELF" </dev/null | tee "$QEMU_LOG"
QEMU_RC=${PIPESTATUS[0]}
set -e
[ "$QEMU_RC" -ne 124 ] || fail "QEMU test timed out after ${QEMU_TIMEOUT_S}s"
[ "$QEMU_RC" -eq 0 ] || fail "QEMU test exited with $QEMU_RC"
SUMMARY="$(grep -E '^qemu-test: [0-9]+ passed, 0 failed$' "$QEMU_LOG" || true)"
[ -n "$SUMMARY" ] || fail "QEMU test printed no passing summary"
QEMU_PASSED="$(echo "$SUMMARY" | sed -E 's/^qemu-test: ([0-9]+) passed.*/\1/')"
[ "$QEMU_PASSED" -gt 0 ] || fail "QEMU test ran no check"
ok "QEMU test: $QEMU_PASSED checks passed"
passed=$((passed + QEMU_PASSED - 1))

echo "firmware-nrf/ci.sh: $passed passed, 0 failed"
