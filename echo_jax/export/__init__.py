"""Export of a trained checkpoint: stable names and safetensors (`names`,
`bundle`), a NumPy reference forward (`numpy_forward`), a `jax.export`
artifact (`jax_export`) and an ONNX graph (`onnx_export`); `tools/export.py`
runs them and checks each against the live JAX model."""
