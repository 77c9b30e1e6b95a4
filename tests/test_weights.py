"""External data (aim/weights.py): torch.onnx's one-file-per-weight output gathered into one file,
references kept when graphs share a folder, one tensor read alone; checked against numpy and ONNX Runtime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aim.errors import InvalidGraphError
from aim.weights import ALIGN, data_files, external_tensors, read_blocks, save_model, where


def chain_model(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x [batch, n] -> MatMul by each weight in turn -> logits."""
    nodes, previous = [], "x"
    for i in range(len(weights)):
        out = "logits" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [out], name=f"matmul{i}"))
        previous = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights[0].shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weights[-1].shape[1]])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def chain_reference(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    for w in weights:
        x = x.astype(np.float64) @ w.astype(np.float64)
    return x


def per_tensor_files(model: onnx.ModelProto, folder) -> None:
    """What torch.onnx writes past 2 GiB: every weight in a file of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(
        model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
    )


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((48, 48), dtype=np.float32) / 7 for _ in range(3)] + [
        rng.standard_normal((48, 10), dtype=np.float32)
    ]


def outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_per_tensor_files_are_gathered_into_one_aligned_file(tmp_path, weights):
    scratch = tmp_path / "scratch"
    per_tensor_files(chain_model(weights), scratch)
    assert len(list(scratch.iterdir())) == 1 + len(weights)  # the graph and a file per weight
    model = onnx.load(str(scratch / "model.onnx"), load_external_data=False)
    path = save_model(model, tmp_path / "out" / "exported.onnx", weights_dir=scratch)
    for file in scratch.iterdir():
        file.unlink()  # the gathered graph needs none of them
    assert sorted(p.name for p in path.parent.iterdir()) == ["exported.onnx", "exported.onnx.data"]
    saved = onnx.load(str(path), load_external_data=False)
    assert data_files(saved) == ["exported.onnx.data"]
    offsets = [where(t)[1] for t in external_tensors(saved)]
    assert len(offsets) == len(weights) and all(offset % ALIGN == 0 for offset in offsets)
    for tensor, expected in zip(external_tensors(saved), weights):
        blocks = list(read_blocks(tensor, path.parent, block_bytes=1000))  # blocks that do not divide the rows
        assert len(blocks) > 1
        np.testing.assert_array_equal(np.concatenate(blocks).reshape(expected.shape), expected)
    x = np.random.default_rng(1).standard_normal((2, 48), dtype=np.float32)
    np.testing.assert_allclose(
        outputs(path, x), chain_reference(x, weights), rtol=1e-4, atol=1e-4
    )  # fp32 sums of 48 terms


def test_a_graph_saved_beside_the_weights_refers_to_them(tmp_path, weights):
    """A second graph in the same folder shares the data file; elsewhere it gets its own copy."""
    first = save_model(chain_model(weights), tmp_path / "first.onnx")  # in memory, under 2 GiB: one file
    assert data_files(onnx.load(str(first), load_external_data=False)) == []
    per_tensor_files(chain_model(weights), tmp_path / "scratch")
    exported = save_model(
        onnx.load(str(tmp_path / "scratch" / "model.onnx"), load_external_data=False),
        tmp_path / "build" / "exported.onnx",
        weights_dir=tmp_path / "scratch",
    )
    data = exported.parent / "exported.onnx.data"
    size = data.stat().st_size
    beside = save_model(onnx.load(str(exported), load_external_data=False), exported.parent / "second.onnx")
    assert beside.stat().st_size < 10_000 and data.stat().st_size == size
    assert sorted(p.name for p in exported.parent.iterdir()) == ["exported.onnx", "exported.onnx.data", "second.onnx"]
    elsewhere = save_model(
        onnx.load(str(exported), load_external_data=False),
        tmp_path / "other" / "third.onnx",
        weights_dir=exported.parent,
    )
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["third.onnx", "third.onnx.data"]
    x = np.ones((1, 48), np.float32)
    np.testing.assert_array_equal(outputs(beside, x), outputs(elsewhere, x))


def test_a_graph_whose_weights_are_not_beside_it_is_refused(tmp_path, weights):
    per_tensor_files(chain_model(weights), tmp_path / "scratch")
    model = onnx.load(str(tmp_path / "scratch" / "model.onnx"), load_external_data=False)
    with pytest.raises(InvalidGraphError, match="not in"):
        save_model(model, tmp_path / "elsewhere" / "model.onnx")  # weights_dir not given: they must be beside it
    assert not (tmp_path / "elsewhere" / "model.onnx").exists()


def test_a_location_outside_the_folder_is_refused(tmp_path, weights):
    per_tensor_files(chain_model(weights), tmp_path / "scratch")
    model = onnx.load(str(tmp_path / "scratch" / "model.onnx"), load_external_data=False)
    external_tensors(model)[0].external_data[0].value = "../secret"
    with pytest.raises(InvalidGraphError, match="beside the model"):
        save_model(model, tmp_path / "out" / "model.onnx", weights_dir=tmp_path / "scratch")
