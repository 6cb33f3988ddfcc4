#!/usr/bin/env bash
# Build the appliance's images and, with --save DIR, write each as a tarball for the
# offline bundle (`appliance bundle` picks them up from there).
#
#   images/build.sh [--cli docker|podman] [--save DIR] [control-plane] [vllm] [trtllm]
#
# With no image names it builds all three. Tags match the defaults in appliance.toml
# (engines.vllm.image, engines.trtllm.image).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cli=${CONTAINER_CLI:-docker}
save=""
images=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cli) cli=$2; shift 2 ;;
        --save) save=$2; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        control-plane|vllm|trtllm) images+=("$1"); shift ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#images[@]} -gt 0 ] || images=(control-plane vllm trtllm)

if ! "$cli" version >/dev/null 2>&1; then
    echo "error: '$cli' cannot reach a container engine; start one, or pick another with --cli" >&2
    exit 1
fi

version=$(python3 -c "import tomllib; print(tomllib.load(open('$root/pyproject.toml','rb'))['project']['version'])")
# The engine versions are pinned in one place, appliance/versions.py (read, not imported:
# building images needs no appliance environment).
pin() {
    python3 -c "import re,sys; print(re.search(r'^$1 = \"([^\"]+)\"', open('$root/appliance/versions.py').read(), re.M).group(1))"
}
vllm_version=$(pin VLLM)
# The vLLM image's Ray joins the appliance's cluster: the release pyproject.toml pins.
ray_version=$(python3 -c "import re,tomllib; deps=tomllib.load(open('$root/pyproject.toml','rb'))['project']['dependencies']; print(next(re.match(r'ray(\[[^]]*\])?==(\S+)', d).group(2) for d in deps if re.match(r'ray(\[[^]]*\])?==', d)))")
trtllm_version=$(pin TRTLLM)
tag_of() {
    case "$1" in
        control-plane) echo "appliance/control-plane:$version" ;;
        vllm) echo "appliance/engine-vllm:$vllm_version" ;;
        trtllm) echo "appliance/engine-trtllm:$trtllm_version" ;;
    esac
}

for image in "${images[@]}"; do
    tag=$(tag_of "$image")
    context="$root/images/$image"
    if [ "$image" = control-plane ] || [ "$image" = vllm ]; then
        # The control plane installs the appliance from a wheel built from this checkout;
        # the vLLM image installs it too, for its vLLM plugin (appliance/vllm_plugin.py).
        rm -rf "$context/dist"
        python3 -m pip wheel --no-deps --wheel-dir "$context/dist" "$root" >/dev/null
    fi
    echo "building $tag"
    args=(--build-arg "APPLIANCE_VERSION=$version")
    if [ "$image" = vllm ]; then
        args+=(--build-arg "VLLM_VERSION=$vllm_version" --build-arg "RAY_VERSION=$ray_version"
               --build-arg "VLLM_IMAGE=docker.io/vllm/vllm-openai:v$vllm_version")
    fi
    "$cli" build --file "$context/Containerfile" --tag "$tag" "${args[@]}" "$context"
    if [ -n "$save" ]; then
        mkdir -p "$save"
        out="$save/$(echo "$tag" | tr '/:' '__').tar"
        echo "saving $tag to $out"
        "$cli" save --output "$out" "$tag"
    fi
done
