"""Lowering: from an exported (plain, shrunk) model to deployment files. Float ONNX (a registered backend) and
the DORY lowering: the integer network, its exact executor, Quantlab and standard-ops ONNX, DORY's text files."""
