#!/usr/bin/env bash
# Reach a glm-serve that listens on 127.0.0.1 of a remote GPU box through an SSH tunnel.
#
#   deploy/ssh_tunnel.sh user@host [-p sshport] [-i keyfile] [local_port] [remote_port]
#   deploy/ssh_tunnel.sh root@region-1.autodl.com -p 12345        # AutoDL-style rented box
#   deploy/ssh_tunnel.sh me@gpu-box 16006 6006                     # local 16006 -> remote 6006
#
# The server keeps its default HOST=127.0.0.1, so nothing but SSH is exposed to the internet.
# Ports default to 6006 on both ends. Ctrl-C closes the tunnel.
set -euo pipefail

usage() {
  # The header comment above is the help text; on a usage error it goes to stderr.
  if [[ "${1:-2}" -eq 0 ]]; then sed -n '2,9s/^# \{0,1\}//p' "$0"; else sed -n '2,9s/^# \{0,1\}//p' "$0" >&2; fi
  exit "${1:-2}"
}

target="" ssh_port="" key="" ports=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -p) [[ $# -ge 2 ]] || usage; ssh_port="$2"; shift 2 ;;
    -i) [[ $# -ge 2 ]] || usage; key="$2"; shift 2 ;;
    -h | --help) usage 0 ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *)
      if [[ -z "$target" ]]; then target="$1"; else ports+=("$1"); fi
      shift
      ;;
  esac
done
[[ -n "$target" && ${#ports[@]} -le 2 ]] || usage

local_port="${ports[0]:-6006}"
remote_port="${ports[1]:-6006}"
for p in "$local_port" "$remote_port" ${ssh_port:+"$ssh_port"}; do
  [[ "$p" =~ ^[0-9]+$ ]] || { echo "not a port number: $p" >&2; exit 2; }
done

ssh_args=(
  -N # no remote shell, only the forwarding
  # Bind the local end to loopback explicitly, even if ssh_config sets GatewayPorts.
  -L "127.0.0.1:${local_port}:127.0.0.1:${remote_port}"
  # Detect dead connections (laptop sleep, NAT timeouts) and exit instead of hanging.
  -o ServerAliveInterval=30
  -o ServerAliveCountMax=3
  # Fail at once if the local port is taken, instead of running without a tunnel.
  -o ExitOnForwardFailure=yes
)
[[ -n "$ssh_port" ]] && ssh_args+=(-p "$ssh_port")
[[ -n "$key" ]] && ssh_args+=(-i "$key")

cat <<EOF
Forwarding 127.0.0.1:${local_port} (here) -> 127.0.0.1:${remote_port} on ${target}. Ctrl-C to stop.
Test from another terminal:
  curl http://127.0.0.1:${local_port}/health
  curl http://127.0.0.1:${local_port}/v1/models
  python clients/openai_request.py --base-url http://127.0.0.1:${local_port}/v1
EOF
exec ssh "${ssh_args[@]}" "$target"
