"""Export of trained UNets to deployable graphs (ONNX), apart from the runtime."""
