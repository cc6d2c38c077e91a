#!/usr/bin/env bash
# make docker-test: build docker/Dockerfile on a Debian base made here, run the plan and 20
# steps of the tiny profile inside the container, print build time, image size and final loss.
#
# No registry is reachable, Debian's packages are (recipe measured in FEASIBILITY.md):
#   docker.io + debootstrap from Debian; dockerd with iptables, ip forwarding, masquerading and
#   the bridge off (host networking untouched; every build and run uses --network host);
#   debootstrap minbase bookworm with Python 3.11 (the CPU torch wheel on this machine is for
#   3.11), g++ and the Python headers (DeepSpeed builds its CPU communication op at start), plus
#   this machine's CA bundle (the package proxy re-signs HTTPS); docker import.
# Nothing is cached between runs: everything lives under $WORK and is removed at the end, with
# dockerd stopped by its pid and its mounts removed. Runs as root (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${APT_DOCKER_DIR:-/tmp/apt-docker-test}
IMAGE=apt-trainops:test
BASE_IMAGE=local/debian:base
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA=/etc/ssl/certs/ca-certificates.crt
DOCKER=(docker -H "unix://$WORK/docker.sock")
t0=$(date +%s)
say() { echo "docker-test | $*"; }

[ "$(id -u)" = 0 ] || { echo "docker-test: needs root (dockerd, debootstrap)" >&2; exit 2; }

cleanup() {
    local rc=$?
    if [ -f "$WORK/dockerd.pid" ]; then
        local pid; pid=$(cat "$WORK/dockerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    # dockerd leaves its network namespace mount (and overlay mounts if killed) behind.
    if [ -d "$WORK" ]; then
        grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
        rm -rf "$WORK"
    fi
    rm -f "$REPO"/docker/wheels/torch-*.whl
    say "cleaned up (exit $rc) after $(( $(date +%s) - t0 )) s"
}
trap cleanup EXIT
trap "exit 143" INT TERM   # a killed run cleans up too
rm -rf "$WORK"; mkdir -p "$WORK"

# 1. Tools from Debian's packages (dockerd, and the docker.io client, which has BuildKit).
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
[ -x /usr/bin/docker ] && DOCKER[0]=/usr/bin/docker
t_tools=$(date +%s); say "tools ready in $((t_tools - t0)) s"

# 2. The daemon, changing no host networking.
dockerd --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none \
    --storage-driver=overlay2 --data-root="$WORK/root" --exec-root="$WORK/exec" \
    --pidfile="$WORK/dockerd.pid" --host "unix://$WORK/docker.sock" >"$WORK/dockerd.log" 2>&1 &
for _ in $(seq 60); do "${DOCKER[@]}" info >/dev/null 2>&1 && break; sleep 0.5; done
"${DOCKER[@]}" info >/dev/null || { tail -20 "$WORK/dockerd.log"; exit 1; }

# 3. The base: Debian minbase with Python and this machine's CA bundle.
debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++,ca-certificates \
    "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
cp "$CA" "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
tar -C "$WORK/rootfs" -c . | "${DOCKER[@]}" import \
    --change "ENV PIP_CERT=$CA" --change "ENV SSL_CERT_FILE=$CA" - "$BASE_IMAGE" >/dev/null
t_base=$(date +%s); say "base image in $((t_base - t_tools)) s"

# 4. The CPU torch wheel for the container's Python (3.11), as pip resolves constraints/cpu.txt's
# pin here; refuse anything that is not the CPU build.
torch_pin=$(grep -E '^torch==' constraints/cpu.txt)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d docker/wheels "$torch_pin"
wheel=$(ls docker/wheels/torch-*.whl)
case "$wheel" in *+cpu-*) ;; *) echo "docker-test: $wheel is not the CPU torch build" >&2; exit 1;; esac
say "torch wheel $(basename "$wheel") ($(( $(stat -c %s "$wheel") / 1048576 )) MiB)"

# 5. Build (the classic builder: the preinstalled client has no buildx).
DOCKER_BUILDKIT=0 "${DOCKER[@]}" build -q --network host -f docker/Dockerfile \
    --build-arg BASE="$BASE_IMAGE" --build-arg EXTRAS= -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; exit 1; }
t_build=$(date +%s)
size=$("${DOCKER[@]}" image inspect -f '{{.Size}}' "$IMAGE")
say "image built in $((t_build - t_base)) s, $((size / 1048576)) MiB"

# 6. Inside the container: the plan, then 20 steps of the tiny profile; the last step's loss.
"${DOCKER[@]}" run --rm --network host "$IMAGE" python -m apt plan --profile 70b --nodes 8 --gpus-per-node 8
"${DOCKER[@]}" run --rm --network host -e OMP_NUM_THREADS=2 "$IMAGE" sh -c '
    set -e
    python launch/train.py --profile tiny --set training.max_steps=20 \
        --set training.warmup_steps=5 --set training.log_interval=5 --set output.sample_tokens=0 \
        --set output.dir=/tmp/runs
    python -c "import json, glob, torch
rec = [json.loads(l) for l in open(glob.glob(\"/tmp/runs/*/metrics.jsonl\")[0])]
steps = [r for r in rec if \"loss\" in r and \"step\" in r]
first, last = steps[0][\"loss\"], steps[-1][\"loss\"]
print(\"docker-test | in-container torch %s, %d steps, loss %.4f -> final loss %.4f\"
      % (torch.__version__, len(steps), first, last))
assert len(steps) == 20 and last < first, steps"'
t_run=$(date +%s)
say "ran in $((t_run - t_build)) s; total $((t_run - t0)) s (tools $((t_tools - t0)), base $((t_base - t_tools)), build $((t_build - t_base)))"
