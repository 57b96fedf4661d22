"""Export of the one-graph form: the traced program as modules torch.export takes (`program`), ONNX with
the state as explicit inputs and outputs and its onnxruntime session (`onnx`), and TensorRT's
structural checks (`tensorrt`)."""
