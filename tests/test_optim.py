"""graphc.optim: each optimiser's update graph against an independent float64 numpy version of
the published rule and against torch.optim, over several steps and parameter shapes."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import optim
from graphc.errors import GraphcError

TARGET = "cpu"
SHAPES = [(5,), (3, 7), (2, 3, 3, 3)]
CONFIGS = [
    (optim.SGD, {"lr": 0.1}),
    (optim.SGD, {"lr": 0.05, "weight_decay": 0.01}),
    (optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.001}),
    (optim.Adam, {"lr": 0.01}),
    (optim.Adam, {"lr": 0.003, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.02}),
]


class UpdateProgram:
    """The update graph of one optimiser for one parameter, compiled once."""

    def __init__(self, opt, shape):
        graph = graphc.Graph("update")
        param, grad = graph.input("p", shape), graph.input("g", shape)
        state = {slot: graph.input(f"p.{slot}", shape) for slot in opt.slots}
        scalars = {name: graph.input(name, ()) for name in opt.scalar_inputs}
        new_param, new_state = opt.update(param, grad, state, scalars)
        graph.output(new_param, *(new_state[s] for s in opt.slots))
        self.opt, self.model = opt, graphc.compile(graph, target=TARGET)

    def step(self, p, g, state, step):
        feeds = {"p": p, "g": g, **{f"p.{s}": state[s] for s in self.opt.slots},
                 **self.opt.scalar_values(step)}
        new_p, *new_state = self.model.run(feeds)
        return new_p, dict(zip(self.opt.slots, new_state))


def numpy_update(cls, cfg, p, g, state, t):
    """The published rules in float64 (PyTorch's formulation)."""
    wd = cfg.get("weight_decay", 0.0)
    g = g + wd * p
    if cls is optim.SGD:
        mu = cfg.get("momentum", 0.0)
        if not mu:
            return p - cfg["lr"] * g, state
        buf = mu * state["momentum"] + g
        direction = g + mu * buf if cfg.get("nesterov") else buf
        return p - cfg["lr"] * direction, {"momentum": buf}
    b1, b2 = cfg.get("betas", (0.9, 0.999))
    eps = cfg.get("eps", 1e-8)
    m = b1 * state["m"] + (1 - b1) * g
    v = b2 * state["v"] + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - cfg["lr"] * m_hat / (np.sqrt(v_hat) + eps), {"m": m, "v": v}


@pytest.mark.parametrize("cls,cfg", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_update_matches_numpy_rule(cls, cfg, shape):
    rng = np.random.default_rng(len(shape))
    opt = cls(**cfg)
    program = UpdateProgram(opt, shape)
    p = rng.standard_normal(shape).astype(np.float32)
    state = {s: np.zeros(shape, np.float32) for s in opt.slots}
    p64, state64 = p.astype(np.float64), {s: a.astype(np.float64) for s, a in state.items()}
    for t in range(1, 6):
        g = rng.standard_normal(shape).astype(np.float32)
        p, state = program.step(p, g, state, t)
        p64, state64 = numpy_update(cls, cfg, p64, g.astype(np.float64), state64, t)
        np.testing.assert_allclose(p, p64, rtol=1e-5, atol=1e-6)
        for s in opt.slots:
            np.testing.assert_allclose(state[s], state64[s], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,cfg", CONFIGS)
def test_update_matches_torch_optim(cls, cfg):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    shape = (4, 6)
    opt = cls(**cfg)
    program = UpdateProgram(opt, shape)
    p = rng.standard_normal(shape).astype(np.float32)
    state = {s: np.zeros(shape, np.float32) for s in opt.slots}
    tp = torch.nn.Parameter(torch.tensor(p))
    torch_opt = (torch.optim.SGD if cls is optim.SGD else torch.optim.Adam)([tp], **cfg)
    for t in range(1, 11):
        g = rng.standard_normal(shape).astype(np.float32)
        p, state = program.step(p, g, state, t)
        tp.grad = torch.tensor(g)
        torch_opt.step()
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_learning_rate_is_a_graph_input():
    """Changing lr changes the step without building or compiling anything new."""
    opt = optim.SGD(lr=0.1, momentum=0.5)
    program = UpdateProgram(opt, (3,))
    p, g = np.ones(3, np.float32), np.ones(3, np.float32)
    state = {"momentum": np.zeros(3, np.float32)}
    first, _ = program.step(p, g, state, 1)
    opt.lr = 0.01
    second, _ = program.step(p, g, state, 1)
    np.testing.assert_allclose(1 - first, 10 * (1 - second), rtol=1e-5)


def test_optimizer_state_follows_parameter_shapes():
    opt = optim.Adam()
    opt.init_state({"w": np.ones((2, 3), np.float32)})
    assert set(opt.state) == {"w.m", "w.v"} and opt.state["w.m"].shape == (2, 3)
    opt.state["w.m"] += 1
    opt.init_state({"w": np.ones((2, 3), np.float32)})  # kept: a second fit continues
    assert opt.state["w.m"].max() == 1
    assert optim.get_optimizer("sgd").lr == 0.01
    assert isinstance(optim.get_optimizer("Adam"), optim.Adam)


def test_optimizer_errors():
    with pytest.raises(GraphcError, match="lr"):
        optim.SGD(lr=-1)
    with pytest.raises(GraphcError, match="nesterov"):
        optim.SGD(nesterov=True)
    with pytest.raises(GraphcError, match="betas"):
        optim.Adam(betas=(0.9, 1.0))
    with pytest.raises(GraphcError, match="unknown optimizer"):
        optim.get_optimizer("rmsprop")
