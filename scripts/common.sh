# Shared helpers of scripts/test, scripts/stack and scripts/bench. Sourced, not run.
# shellcheck shell=bash

# Repository root (the folder holding Cargo.toml), wherever the caller runs from.
SB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SB_ROOT

# The etcd the tests and the stack use: Debian's, unless SWITCHBOARD_TEST_ETCD names another.
SB_ETCD="${SWITCHBOARD_TEST_ETCD:-/usr/bin/etcd}"

sb_say() { printf '%s %s\n' "${SB_TAG:-==>}" "$*" >&2; }
sb_die() { printf '%s error: %s\n' "${SB_TAG:-==>}" "$*" >&2; exit 1; }

# Seconds since the epoch with milliseconds, for step timings.
sb_now() { date +%s.%3N; }
# Elapsed seconds since $1, formatted like 12.3s.
sb_since() { awk -v a="$1" -v b="$(sb_now)" 'BEGIN { printf "%.1fs", b - a }'; }

# Makes sure the system tools the build and the tests need exist: protoc (protobuf-compiler)
# and etcd (etcd-server). Installs them with apt when running as root on a machine with
# apt-get (one `apt-get update`, then one install); otherwise explains and exits 1.
sb_ensure_system_tools() {
    local missing=()
    command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
    [[ -x "$SB_ETCD" ]] || missing+=(etcd-server)
    ((${#missing[@]} == 0)) && return 0

    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        sb_say "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || sb_die "apt-get update failed"
        apt-get install -y -qq "${missing[@]}" >/dev/null || sb_die "apt-get install ${missing[*]} failed"
    else
        {
            echo "missing: ${missing[*]}"
            echo "install them, for example on Debian/Ubuntu:"
            echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}"
            echo "(protoc must be on PATH; etcd is expected at $SB_ETCD,"
            echo " or point SWITCHBOARD_TEST_ETCD at another etcd 3.4+ binary)"
        } >&2
        exit 1
    fi
    command -v protoc >/dev/null 2>&1 || sb_die "protoc still missing after install"
    [[ -x "$SB_ETCD" ]] || sb_die "$SB_ETCD still missing after install"
}

# Makes sure cargo, and the cargo subcommands named as arguments (fmt, clippy), are present.
# shellcheck disable=SC2120 # the arguments are optional
sb_ensure_rust() {
    command -v cargo >/dev/null 2>&1 ||
        sb_die "cargo not found: install Rust from https://rustup.rs (then open a new shell)"
    local sub comp
    for sub in "$@"; do
        cargo "$sub" --version >/dev/null 2>&1 && continue
        comp="$sub"
        [[ "$sub" == fmt ]] && comp=rustfmt
        command -v rustup >/dev/null 2>&1 ||
            sb_die "cargo $sub is missing: install the $comp component of your Rust toolchain"
        sb_say "adding the Rust component $comp (cargo $sub is missing)"
        rustup component add "$comp" || sb_die "rustup component add $comp failed"
    done
}
