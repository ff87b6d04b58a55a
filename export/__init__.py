"""Export of trained UNets to deployable graphs, apart from the runtime (it depends only on the
engine's math, noise, errors and cache modules, never on ddpm_engine.engine):

- iospec.py: the one I/O contract shared by exporter and runtimes (input names, dtypes and
  shapes: ``sample`` float32 [B, C, H, W], ``timestep`` int64 [B] -> ``model_output``), the
  metadata that ties a graph to its model (weights hash, sample shape), and the checks of a graph
  or an ONNX Runtime session against it;
- onnx_export.py: ``export_onnx`` (fp32, dynamic batch, TorchScript or dynamo exporter), cached
  on disk by ``ddpm_engine.cache``;
- tensorrt_build.py: a TensorRT engine (``.plan``) built from that ONNX graph, with a batch
  profile and a shared timing cache (import-gated: needs ``tensorrt``; UNVERIFIED, never run).
"""
