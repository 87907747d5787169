"""Lowering backends: from an exported (plain, shrunk) model to deployment files. Float ONNX today."""
