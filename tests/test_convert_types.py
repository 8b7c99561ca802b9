"""python -m server.convert --type q8_0 / q4_0: every matrix in the quantized type, every 1-D tensor float32, and
the quantized weights within the rounding of their type of the checkpoint's (what llama.cpp then computes with;
bench/gguf_types.py measures what that does to the answers)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.support import CHATGLM3_FIXTURES

# relative RMS error of a block-of-32 quantizer on Gaussian weights: q8_0 ~0.0054, q4_0 ~0.086 (measured)
BOUND = {"q8_0": 0.007, "q4_0": 0.1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert-types") / "chatglm3"
    subprocess.run([sys.executable, str(CHATGLM3_FIXTURES / "make_vllm_shape.py"), str(folder),
                    str(CHATGLM3_FIXTURES)], check=True, capture_output=True)
    return folder


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_types_hold_the_checkpoints_weights(checkpoint, tmp_path, kind):
    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    from server.convert import convert, tensor_name

    source = load_file(str(checkpoint / "model.safetensors"))
    names = {tensor_name(name, 2): name for name in source if not name.endswith("inv_freq")}
    reader = gguf.GGUFReader(str(convert(str(checkpoint), tmp_path / f"m.{kind}.gguf", kind)))
    assert {t.name for t in reader.tensors} == set(names)
    for tensor in reader.tensors:
        want = source[names[tensor.name]]
        got = dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want)
        else:
            assert tensor.tensor_type.name == kind.upper(), tensor.name
            error = np.sqrt(np.mean((got - want) ** 2)) / want.std()
            assert error < BOUND[kind], (tensor.name, error)
