#!/usr/bin/env bash
# Makes .venv-convert/, the environment meshai converts ONNX stages to LiteRT .tflite in (onnx2tf with
# TensorFlow, about 2.6 GB: kept out of .venv, whose onnx/onnxruntime/numpy it would pin back).
# Idempotent: does nothing when the environment already holds exactly these pins.  Needs python3
# 3.10–3.12 with venv and pip (PYTHON=… picks another interpreter); the pins were checked together on
# CPython 3.11 (onnx2tf 1.29.24 is its last release for Python < 3.12).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV="${CONVERT_ENV:-$ROOT/.venv-convert}"
BASE="${PYTHON:-python3}"

# onnx2tf==1.29.24 pins its own dependencies; these pin the rest of what it brings.
CONSTRAINTS='absl-py==2.5.1 ai-edge-litert==2.1.0 astunparse==1.6.3 backports.strenum==1.2.8
certifi==2026.10.19.post1 charset-normalizer==3.5.3 coloredlogs==15.0.1 flatbuffers==25.12.19 gast==0.7.0
google-pasta==0.2.0 grpcio==1.85.3 h5py==3.11.0 humanfriendly==10.0 idna==3.20 json2onnx==2.0.3
keras==3.15.1 libclang==18.1.1 Markdown==3.11.3 markdown-it-py==4.3.0 MarkupSafe==3.0.4 mdurl==0.1.2
ml_dtypes==0.5.1 mpmath==1.3.0 namex==0.1.0 numpy==1.26.4 onnx==1.19.1 onnx2json==2.0.4 onnx2tf==1.29.24
onnx_graphsurgeon==0.5.8 onnxoptimizer==0.4.2 onnxruntime==1.23.0 onnxsim==0.4.36
opencv-python==4.11.0.86 opt_einsum==3.4.0 optree==0.20.0 packaging==26.4 protobuf==4.25.5 psutil==5.9.5
Pygments==2.21.0 requests==2.32.5 rich==15.0.0 sam4onnx==2.0.0 sbi4onnx==1.0.7 scc4onnx==1.0.7
scs4onnx==1.0.18 sde4onnx==1.0.0 sed4onnx==1.0.5 simple_onnx_processing_tools==1.1.32 sio4onnx==1.0.3
sit4onnx==1.0.10 six==1.17.0 sna4onnx==1.0.6 snc4onnx==1.0.14 snd4onnx==1.1.7 sne4onnx==2.0.1
sng4onnx==2.0.1 soa4onnx==1.0.5 soc4onnx==1.0.2 sod4onnx==1.0.0 sog4onnx==1.0.17 sor4onnx==1.0.7
spo4onnx==1.0.5 ssc4onnx==1.0.8 ssi4onnx==1.0.4 svs4onnx==1.0.0 sympy==1.14.0 tensorboard==2.19.0
tensorboard-data-server==0.7.2 tensorflow==2.19.0 tensorflow-io-gcs-filesystem==0.37.1 termcolor==3.3.0
tf_keras==2.19.0 tqdm==4.70.1 typing_extensions==4.16.0 urllib3==2.8.0 Werkzeug==3.1.9 wrapt==2.5.2'

PROBE='import importlib.util, sys; sys.exit(importlib.util.find_spec("onnx2tf") is None)'
STAMP="$ENV/.meshai-convert-$(printf '%s' "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" ]] && "$ENV/bin/python" -c "$PROBE" 2>/dev/null; then
    echo "convert-env: $ENV is ready"
    exit 0
fi

if ! "$BASE" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
    echo "convert-env: $BASE must be CPython 3.10–3.12 (TensorFlow 2.19); set PYTHON=python3.11" >&2
    exit 1
fi

echo "convert-env: installing onnx2tf and TensorFlow into $ENV (about 2.6 GB, a minute or two)"
[[ -x "$ENV/bin/python" ]] || "$BASE" -m venv "$ENV"
rm -f "$ENV"/.meshai-convert-*
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
tr ' ' '\n' <<<"$CONSTRAINTS" >"$pins"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$ENV/bin/python" -m pip install -qq --upgrade pip
"$ENV/bin/python" -m pip install -qq -c "$pins" onnx2tf==1.29.24
"$ENV/bin/python" -c 'import onnx2tf' >/dev/null 2>&1
touch "$STAMP"
echo "convert-env: $ENV is ready ($(du -sh "$ENV" | cut -f1))"
