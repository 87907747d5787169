"""The IR: a torch.fx GraphModule with typed `duccio_*` annotations, the tracer, the op registry and its
channel rules, the channel solver, the pass infrastructure and the IR printer."""
