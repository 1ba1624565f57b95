#!/usr/bin/env bash
# make deploy-check: build the docker deployment from nothing but Debian's packages and the Python
# packages pip reaches here, start docker-compose.yml (with deploy/compose.local.yml), drive the
# end-to-end flow against the containers, and tear it all down. Any failure exits non-zero.
#
# Settings (environment): DEPLOY_CACHE (rootfs, wheelhouse, logs; default /var/cache/recmerge-deploy),
# DEPLOY_MIRROR (Debian mirror; default: the one apt uses here), DEPLOY_REBUILD=1 (rebuild the cached
# base images too), DEPLOY_API_PORT / DEPLOY_PG_PORT / DEPLOY_REDIS_PORT / DEPLOY_WHEEL_PORT
# (18000 / 15432 / 16379 / 18081).
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # dockerd and debootstrap live there; sudo-less root shells may lack it

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${DEPLOY_CACHE:-/var/cache/recmerge-deploy}
LOG=${DEPLOY_LOG:-$CACHE/deploy-check.log}
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
PROJECT=recmerge-deploycheck
COMPOSE_FILES=(-f "$ROOT/docker-compose.yml" -f "$ROOT/deploy/compose.local.yml")
RENDERED=$CACHE/compose.rendered.yml
DC=(docker-compose -p "$PROJECT" --project-directory "$ROOT" -f "$RENDERED")
DEBIAN_IMAGE=recmerge-debian:$SUITE
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || PY=python3
export DEPLOY_API_PORT=${DEPLOY_API_PORT:-18000} DEPLOY_PG_PORT=${DEPLOY_PG_PORT:-15432}
export DEPLOY_REDIS_PORT=${DEPLOY_REDIS_PORT:-16379}
# Fixed, not picked at random: its URL is a build argument, and a new one would void the layer cache.
WHEEL_PORT=${DEPLOY_WHEEL_PORT:-18081}
# The Docker CLI may be newer than Debian's engine and have no buildx: the classic builder is what
# both understand, and what docker-compose 1.x uses.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
# The lead's trainings share these two cores.
NICE=(nice -n 10)

mkdir -p "$CACHE"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

STEPS=()
T_ALL=$(date +%s.%N)
step() {  # step NAME command...: run it with its name and duration on the log
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  echo "==> $name"
  "$@"
  local dt; dt=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
  echo "<== $name: $dt s"
  STEPS+=("$(printf '%-60s %7s s' "$name" "$dt")")
}

STARTED_DOCKERD=""
WHEEL_SERVER=""
UP=""
cleanup() {
  local rc=$?
  set +e
  if [ -n "$UP" ]; then
    if [ "$rc" != 0 ]; then
      echo "--- container states and logs (the run failed) ---"
      "${DC[@]}" ps
      "${DC[@]}" logs --no-color --tail 60
    fi
    echo "==> teardown (containers, volumes, networks; the images stay cached)"
    "${DC[@]}" down --volumes --remove-orphans
  fi
  rm -f "$RENDERED" "$RENDERED.in"
  [ -n "$WHEEL_SERVER" ] && kill "$WHEEL_SERVER" 2>/dev/null && wait "$WHEEL_SERVER" 2>/dev/null
  if [ -n "$STARTED_DOCKERD" ]; then
    echo "==> stopping the docker engine this check started (pid $STARTED_DOCKERD)"
    kill "$STARTED_DOCKERD" && wait "$STARTED_DOCKERD" 2>/dev/null
  fi
  if [ "$rc" = 0 ]; then echo "deploy-check: PASSED"; else echo "deploy-check: FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT

apt_mirror() {  # the Debian mirror apt uses here, so that debootstrap reaches what apt reaches
  if [ -n "${DEPLOY_MIRROR:-}" ]; then echo "$DEPLOY_MIRROR"; return; fi
  local f files=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] && files+=("$f")
  done
  sed -n -E -e 's#^URIs:[[:space:]]*([^[:space:]]*/debian)/?$#\1#p' \
      -e 's#^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]*/debian)/?[[:space:]].*#\2#p' \
      "${files[@]}" | head -1
}

tools() {
  local missing="" pc
  for pc in docker.io:dockerd debootstrap:debootstrap docker-compose:docker-compose bc:bc; do
    command -v "${pc#*:}" >/dev/null || missing="$missing ${pc%%:*}"
  done
  if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || { echo "missing Debian packages:$missing (run as root, or install them)"; return 1; }
    echo "installing$missing"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${NICE[@]}" apt-get install -y -q --no-install-recommends $missing >/dev/null
  fi
  docker --version; docker-compose version --short; debootstrap --version
}

engine() {
  if docker info >/dev/null 2>&1; then echo "a docker engine is running already: using it"; return; fi
  local dlog=$CACHE/dockerd.log
  # No iptables and no bridge: this machine's network is not ours to rewire; containers use the host's.
  dockerd --iptables=false --bridge=none >"$dlog" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && { echo "started dockerd (pid $STARTED_DOCKERD, log $dlog)"; return; }
    kill -0 "$STARTED_DOCKERD" 2>/dev/null || { tail -20 "$dlog"; return 1; }
    sleep 1
  done
  tail -20 "$dlog"; return 1
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
drop_superseded() {  # drop_superseded IMAGE OLD_ID: a rebuild leaves the old image untagged; free its space
  local now; now=$(image_id "$1")
  if [ -n "$2" ] && [ "$2" != "$now" ]; then docker image rm "$2" >/dev/null 2>&1 || true; fi
}

base_image() {
  if have_image "$DEBIAN_IMAGE" && [ -z "${DEPLOY_REBUILD:-}" ]; then echo "$DEBIAN_IMAGE is cached"; return; fi
  local mirror rootfs
  mirror=$(apt_mirror)
  [ -n "$mirror" ] || { echo "no Debian mirror found in /etc/apt/sources.list*; set DEPLOY_MIRROR"; return 1; }
  rootfs=$CACHE/rootfs-$SUITE
  local old; old=$(image_id "$DEBIAN_IMAGE")
  rm -rf "$rootfs"
  echo "debootstrap --variant=minbase $SUITE from $mirror"
  "${NICE[@]}" debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log"; return 1; }
  # Package installs in image builds must not try to start their services (no init runs there).
  printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
  chmod +x "$rootfs/usr/sbin/policy-rc.d"
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$SUITE" "$mirror" "$SUITE" \
    > "$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -c . | docker import --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE"
  rm -rf "$rootfs"
  drop_superseded "$DEBIAN_IMAGE" "$old"
}

build_local() {  # build_local IMAGE DOCKERFILE: one of deploy/'s images, cached once built
  if have_image "$1" && [ -z "${DEPLOY_REBUILD:-}" ]; then echo "$1 is cached"; return; fi
  local old; old=$(image_id "$1")
  "${NICE[@]}" docker build -q --network host --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$1" \
    -f "$ROOT/deploy/$2" "$ROOT/deploy"
  drop_superseded "$1" "$old"
}

index_env() {  # this machine's pip index settings (http and https ones, its CA bundle) as NAME=VALUE lines
  "$PY" - <<'EOF'
import os
import subprocess
import sys

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = {}
for line in listed.splitlines():
    key, _, value = line.partition("=")
    conf[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
for name in ("index-url", "extra-index-url"):
    var = "PIP_" + name.upper().replace("-", "_")
    urls = [u for u in os.environ.get(var, conf.get(name, "")).split() if u.startswith(("http://", "https://"))]
    if urls:
        print(f"{var}={' '.join(urls)}")
cert = os.environ.get("PIP_CERT", conf.get("cert", ""))
if cert and os.path.isfile(cert):
    print(f"PIP_CERT={cert}")
EOF
}

wheelhouse() {
  # What the image installs, gathered once here so that the image build needs no index and no
  # credentials. torch first, through this machine's pip configuration: its find-links hold the CPU
  # build, where an index would give the CUDA one.
  mkdir -p "$CACHE/wheels"
  { "${NICE[@]}" "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/wheels" "torch==2.13.0" 2>&1; } |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
  ls "$CACHE"/wheels/torch-2.13.0+cpu-*.whl
  # The rest is resolved by the image's own interpreter: markers differ between Pythons (Debian's 3.11.2
  # needs async-timeout for redis, 3.11.7 does not). This machine's index settings reach only that
  # throwaway container, never an image.
  local req=$CACHE/requirements.txt env=() kv
  "$PY" -c "import sys, tomllib; print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))" \
    "$ROOT/pyproject.toml" > "$req"
  while IFS= read -r kv; do
    echo "${kv%%=*} from this machine's pip configuration"
    case $kv in
      # A TLS-inspecting proxy's CA, say: the container checks certificates with the same bundle.
      PIP_CERT=*) env+=(-v "${kv#PIP_CERT=}:/etc/pip-ca.pem:ro" -e PIP_CERT=/etc/pip-ca.pem) ;;
      *) env+=(-e "$kv") ;;
    esac
  done < <(index_env)
  "${NICE[@]}" docker run --rm --network host "${env[@]}" -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
    -v "$CACHE/wheels:/wheels" -v "$req:/tmp/requirements.txt:ro" recmerge-python:local \
    pip download -q --retries 2 --only-binary=:all: --find-links /wheels -d /wheels \
    "torch==2.13.0" -r /tmp/requirements.txt "setuptools>=68" wheel
  echo "$(ls "$CACHE/wheels" | wc -l) wheels, $(du -sh "$CACHE/wheels" | cut -f1)"
}

serve_wheels() {
  if ss -Hltn "sport = :$WHEEL_PORT" | grep -q .; then echo "port $WHEEL_PORT is in use (set DEPLOY_WHEEL_PORT)"; return 1; fi
  "$PY" -m http.server --bind 127.0.0.1 --directory "$CACHE/wheels" "$WHEEL_PORT" >"$CACHE/wheel-server.log" 2>&1 &
  WHEEL_SERVER=$!
  WHEELS_URL=http://127.0.0.1:$WHEEL_PORT/
  for _ in $(seq 50); do curl -fs -o /dev/null "$WHEELS_URL" && { echo "wheelhouse at $WHEELS_URL"; return; }; sleep 0.1; done
  return 1
}

app_image() {
  local blog=$CACHE/build-app.log old
  old=$(image_id recmerge:local)
  # The full build output (pip's) goes to its own log; the steps and their outcome show here.
  if ! "${NICE[@]}" docker build --network host --build-arg BASE_IMAGE=recmerge-python:local \
      --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="$WHEELS_URL" -t recmerge:local "$ROOT" >"$blog" 2>&1; then
    tail -40 "$blog"; return 1
  fi
  grep -E '^(Step |Successfully|Sending build context)| ---> Using cache' "$blog"
  drop_superseded recmerge:local "$old"
  docker run --rm --network host recmerge:local python -c \
    "import torch, app.main, workers.celery_app; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

ports_free() {
  local p busy=""
  for p in "$DEPLOY_API_PORT" "$DEPLOY_PG_PORT" "$DEPLOY_REDIS_PORT"; do
    ss -Hltn "sport = :$p" | grep -q . && busy="$busy $p"
  done
  [ -z "$busy" ] || { echo "ports in use:$busy (set DEPLOY_*_PORT)"; return 1; }
  echo "ports free: api $DEPLOY_API_PORT, postgres $DEPLOY_PG_PORT, redis $DEPLOY_REDIS_PORT"
}

render() {
  # docker-compose 1.x cannot take a key away in an override (2.x has !reset), and the engine refuses
  # published ports on the host's network: render both files into one and drop those ports there.
  local mask; mask=$(umask)
  umask 077  # the rendering holds the API token
  docker-compose -p "$PROJECT" "${COMPOSE_FILES[@]}" config > "$RENDERED.in"
  "$PY" - "$RENDERED.in" > "$RENDERED" <<'EOF'
import sys

import yaml

doc = yaml.safe_load(open(sys.argv[1]))
for name, svc in doc["services"].items():
    if svc.get("network_mode") == "host" and svc.pop("ports", None):
        print(f"{name}: published ports dropped (it listens on the host's network)", file=sys.stderr)
yaml.safe_dump(doc, sys.stdout, sort_keys=False)
EOF
  umask "$mask"
  rm -f "$RENDERED.in"
  echo "rendered $RENDERED (it holds the API token: removed at the end)"
}

up() {
  render
  "${DC[@]}" down --volumes --remove-orphans >/dev/null 2>&1 || true
  UP=1
  "${DC[@]}" up -d --no-build
}

container() { "${DC[@]}" ps -q "$1"; }

healthy() {
  local end=$((SECONDS + 300)) svc state pending
  while :; do
    pending=""
    for svc in postgres redis api worker; do
      state=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$(container "$svc")")
      [ "$state" = running/healthy ] || pending="$pending $svc=$state"
    done
    [ -z "$pending" ] && break
    [ $SECONDS -lt $end ] || { echo "not healthy after 300 s:$pending"; return 1; }
    sleep 2
  done
  local migrate
  migrate=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(container migrate)")
  [ "$migrate" = "exited 0" ] || { echo "migrate: $migrate"; return 1; }
  echo "postgres, redis, api and worker healthy; migrate exited 0"
}

e2e() {
  "${NICE[@]}" "$PY" "$ROOT/deploy/e2e.py" --url "http://127.0.0.1:$DEPLOY_API_PORT" --token "$RECMERGE_API_TOKEN"
  # The merge ran in the worker's container, not in the API's.
  "${DC[@]}" logs --no-color worker | grep -E "succeeded in|failed|Task .* received"
}

down() {
  "${DC[@]}" down --volumes --remove-orphans
  UP=""
  local left
  local label=label=com.docker.compose.project=$PROJECT
  left=$(docker ps -aq --filter "$label"; docker volume ls -q --filter "$label"; docker network ls -q --filter "$label")
  [ -z "$left" ] || { echo "left behind: $left"; return 1; }
  echo "no container, volume or network of $PROJECT left"
}

echo "deploy-check on $(hostname), $(nproc) cores, $(. /etc/os-release && echo "$PRETTY_NAME"), $(date -u +%FT%TZ)"
export RECMERGE_API_TOKEN
RECMERGE_API_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')

step "tools (docker.io, debootstrap, docker-compose)" tools
step "docker engine" engine
step "base image $DEBIAN_IMAGE (debootstrap + import)" base_image
step "image recmerge-python:local (deploy/python.Dockerfile)" build_local recmerge-python:local python.Dockerfile
step "image recmerge-postgres:local (deploy/postgres.Dockerfile)" build_local recmerge-postgres:local postgres.Dockerfile
step "image recmerge-redis:local (deploy/redis.Dockerfile)" build_local recmerge-redis:local redis.Dockerfile
step "wheelhouse (pip download, host pip config)" wheelhouse
step "wheelhouse server" serve_wheels
step "image recmerge:local (Dockerfile)" app_image
echo "images:"
docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E 'recmerge'
step "ports" ports_free
step "compose up" up
step "health" healthy
step "e2e flow against the containers" e2e
step "teardown" down

echo
printf '%-60s %9s\n' step seconds
printf '%s\n' "${STEPS[@]}"
printf '%-60s %7.1f s\n' "total" "$(echo "$(date +%s.%N) - $T_ALL" | bc)"
