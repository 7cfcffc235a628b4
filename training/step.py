"""The optimizer half of a training step, shared by the Trainer and benchmarks/model.py."""
import jittor as jt


def sgd_step(optimizer: jt.optim.Optimizer, loss: jt.Var) -> None:
    """Gradients of ``loss`` and the SGD update, executed; then the gradients are dropped.

    Jittor's optimizer keeps them in ``param_groups[i]["grads"]`` until the next step, so the
    next forward pass would run with a parameter-sized buffer that nothing reads again (PyTorch's
    ``zero_grad(set_to_none=True)`` frees the same). The next ``step`` creates them afresh."""
    optimizer.step(loss)
    jt.sync_all(True)
    for group in optimizer.param_groups:
        group.pop("grads", None)
